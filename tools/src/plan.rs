//! The memory planner: tensor lifetimes in, arena offsets out.
//!
//! Greedy placement (as TFLM's `GreedyMemoryPlanner`): buffers are placed one at a time, each at
//! the lowest aligned offset where it overlaps no already-placed buffer whose lifetime
//! intersects its own. The order matters, so several orders are tried (largest first, earliest
//! first, longest-lived first, largest size × lifetime first) and the smallest arena wins. Lifetimes are inclusive op steps: step 0 is "before the first op" (graph
//! inputs), ops are steps 1..=n, step n+1 is "after the last op" (graph outputs).

/// One buffer to place: a tensor (or a group of tensors that share bytes in place) or a
/// kernel's scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Bytes.
    pub size: usize,
    /// First step at which it is alive.
    pub first: u16,
    /// Last step at which it is alive.
    pub last: u16,
}

impl Buffer {
    fn alive_with(&self, other: &Buffer) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Where each buffer went, and the arena that holds them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Offset of each buffer, in input order.
    pub offsets: Vec<usize>,
    /// Bytes from 0 to the end of the highest buffer.
    pub arena_bytes: usize,
}

fn align_up(v: usize, align: usize) -> usize {
    v.div_ceil(align) * align
}

/// A sort key that decides the placement order.
type OrderKey = fn(&Buffer) -> (usize, usize);

/// Places `buffers` with every offset a multiple of `align`, trying several greedy orders and
/// keeping the smallest arena.
pub fn plan(buffers: &[Buffer], align: usize) -> Plan {
    let keys: [OrderKey; 4] = [
        |b| (usize::MAX - b.size, b.first as usize),
        |b| (b.first as usize, usize::MAX - b.size),
        |b| (usize::MAX - span(b), usize::MAX - b.size),
        |b| {
            (
                usize::MAX - b.size.saturating_mul(span(b)),
                b.first as usize,
            )
        },
    ];
    keys.iter()
        .map(|key| {
            let mut order: Vec<usize> = (0..buffers.len()).collect();
            order.sort_by_key(|&i| key(&buffers[i]));
            plan_in_order(buffers, &order, align)
        })
        .min_by_key(|p| p.arena_bytes)
        .unwrap_or(Plan {
            offsets: Vec::new(),
            arena_bytes: 0,
        })
}

fn span(b: &Buffer) -> usize {
    (b.last - b.first) as usize + 1
}

/// First-fit placement in the given order.
fn plan_in_order(buffers: &[Buffer], order: &[usize], align: usize) -> Plan {
    let mut offsets = vec![0usize; buffers.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    let mut arena_bytes = 0;
    for &i in order {
        let b = &buffers[i];
        if b.size == 0 {
            continue;
        }
        let mut conflicts: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&p| buffers[p].alive_with(b))
            .map(|&p| (offsets[p], offsets[p] + buffers[p].size))
            .collect();
        conflicts.sort_unstable();
        let mut candidate = 0;
        for (start, end) in conflicts {
            if candidate + b.size <= start {
                break;
            }
            candidate = candidate.max(align_up(end, align));
        }
        offsets[i] = candidate;
        arena_bytes = arena_bytes.max(candidate + b.size);
        placed.push(i);
    }
    Plan {
        offsets,
        arena_bytes,
    }
}

/// The liveness lower bound: the most bytes alive at any one step. No plan can do better.
pub fn liveness_lower_bound(buffers: &[Buffer]) -> usize {
    let last = buffers.iter().map(|b| b.last).max().unwrap_or(0);
    (0..=last)
        .map(|s| {
            buffers
                .iter()
                .filter(|b| b.first <= s && s <= b.last)
                .map(|b| b.size)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chain_reuses_dead_buffers() {
        // a -> op1 -> b -> op2 -> c -> op3 -> d: at most two alive at once.
        let bufs = [
            Buffer {
                size: 100,
                first: 0,
                last: 1,
            },
            Buffer {
                size: 100,
                first: 1,
                last: 2,
            },
            Buffer {
                size: 100,
                first: 2,
                last: 3,
            },
            Buffer {
                size: 100,
                first: 3,
                last: 4,
            },
        ];
        let p = plan(&bufs, 4);
        assert_eq!(p.arena_bytes, 200);
        assert_eq!(liveness_lower_bound(&bufs), 200);
    }

    #[test]
    fn residual_keeps_skip_alive() {
        let bufs = [
            Buffer {
                size: 64,
                first: 0,
                last: 3,
            }, // skip connection
            Buffer {
                size: 64,
                first: 1,
                last: 2,
            },
            Buffer {
                size: 64,
                first: 2,
                last: 3,
            },
            Buffer {
                size: 64,
                first: 3,
                last: 4,
            },
        ];
        let p = plan(&bufs, 16);
        assert_eq!(p.arena_bytes, 192);
    }

    proptest! {
        #[test]
        fn plans_never_overlap_live_buffers(raw in prop::collection::vec((1usize..500, 0u16..20, 0u16..6), 1..40)) {
            let bufs: Vec<Buffer> = raw.iter().map(|&(size, first, len)| Buffer { size, first, last: first + len }).collect();
            let p = plan(&bufs, 16);
            for i in 0..bufs.len() {
                prop_assert_eq!(p.offsets[i] % 16, 0);
                prop_assert!(p.offsets[i] + bufs[i].size <= p.arena_bytes);
                for j in (i + 1)..bufs.len() {
                    if bufs[i].alive_with(&bufs[j]) {
                        let (a0, a1) = (p.offsets[i], p.offsets[i] + bufs[i].size);
                        let (b0, b1) = (p.offsets[j], p.offsets[j] + bufs[j].size);
                        prop_assert!(a1 <= b0 || b1 <= a0, "buffers {} and {} overlap", i, j);
                    }
                }
            }
            prop_assert!(p.arena_bytes >= liveness_lower_bound(&bufs));
        }
    }
}
