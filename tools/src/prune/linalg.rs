//! Dense symmetric linear algebra for the least-squares refits (f64, row-major, small `n`).

/// Cholesky factor `L` (row-major, lower) of `A + ridge·I` for a symmetric positive definite
/// `A`; `None` if it is not positive definite.
pub(super) fn cholesky(a: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (li, lj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let dot: f64 = li.iter().zip(lj).map(|(a, b)| a * b).sum();
            let s = a[i * n + j] + if i == j { ridge } else { 0.0 } - dot;
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solves `L Lᵀ x = b` with a factor from [`cholesky`].
pub(super) fn cho_solve(l: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n];
    for i in 0..n {
        let s: f64 = l[i * n..i * n + i].iter().zip(&y).map(|(a, b)| a * b).sum();
        y[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * n + i];
    }
    x
}

/// Inverse of `A + ridge·I` for a symmetric positive definite `A`; `None` if it is not.
pub(super) fn spd_inverse(a: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    let l = cholesky(a, n, ridge)?;
    // L⁻¹ (lower), then A⁻¹ = L⁻ᵀ L⁻¹.
    let mut li = vec![0f64; n * n];
    for c in 0..n {
        li[c * n + c] = 1.0 / l[c * n + c];
        for r in c + 1..n {
            let s: f64 = (c..r).map(|k| l[r * n + k] * li[k * n + c]).sum();
            li[r * n + c] = -s / l[r * n + r];
        }
    }
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| li[k * n + i] * li[k * n + j]).sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    Some(inv)
}

/// Solves `(A + ridge·I) x = b` for a symmetric positive definite `A` (Cholesky).
#[cfg(test)]
pub(super) fn solve_spd(a: &[f64], b: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    Some(cho_solve(&cholesky(a, n, ridge)?, b, n))
}

/// Greedy removal of input channels from a least-squares fit (group Optimal Brain Surgeon).
///
/// The fit has `n = taps·channels + 1` features (feature `t·channels + c` is channel `c` at
/// filter tap `t`, the last is the bias) with inverse Gram matrix `h_inv` (`n x n`) and optimal
/// weights `w` (`outputs` rows of `n`). Removing channel `c` zeroes its `taps` features; the
/// exact increase of the squared error is `Σ_o w_oGᵀ (H⁻¹_GG)⁻¹ w_oG`, and the remaining
/// weights are updated to the optimum of the reduced fit. Channels are removed one at a time,
/// cheapest first, among those still `alive` (and at least one is kept); returns them in
/// removal order with the error added by each.
pub(super) fn remove_channels_obs(
    h_inv: &mut [f64],
    w: &mut [f64],
    n: usize,
    taps: usize,
    alive: &mut [bool],
    count: usize,
) -> Vec<(usize, f64)> {
    let outputs = w.len() / n;
    let channels = alive.len();
    let living = alive.iter().filter(|&&a| a).count();
    let mut order = Vec::with_capacity(count);
    let group = |c: usize| -> Vec<usize> { (0..taps).map(|t| t * channels + c).collect() };
    for _ in 0..count.min(living.saturating_sub(1)) {
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for c in (0..channels).filter(|&c| alive[c]) {
            let g = group(c);
            let m: Vec<f64> = g
                .iter()
                .flat_map(|&i| g.iter().map(move |&j| (i, j)))
                .map(|(i, j)| h_inv[i * n + j])
                .collect();
            let Some(m_inv) = spd_inverse(&m, taps, 0.0) else {
                continue;
            };
            let mut cost = 0.0;
            for o in 0..outputs {
                let wg: Vec<f64> = g.iter().map(|&i| w[o * n + i]).collect();
                for a in 0..taps {
                    let row: f64 = (0..taps).map(|b| m_inv[a * taps + b] * wg[b]).sum();
                    cost += wg[a] * row;
                }
            }
            if best.as_ref().is_none_or(|b| cost < b.0) {
                best = Some((cost, c, m_inv));
            }
        }
        let Some((cost, c, m_inv)) = best else { break };
        let g = group(c);
        // w_o -= H⁻¹[:, G] · (M⁻¹ w_oG)
        for o in 0..outputs {
            let wg: Vec<f64> = g.iter().map(|&i| w[o * n + i]).collect();
            let z: Vec<f64> = (0..taps)
                .map(|a| (0..taps).map(|b| m_inv[a * taps + b] * wg[b]).sum())
                .collect();
            for i in 0..n {
                let d: f64 = g
                    .iter()
                    .zip(&z)
                    .map(|(&gi, zi)| h_inv[i * n + gi] * zi)
                    .sum();
                w[o * n + i] -= d;
            }
            for &gi in &g {
                w[o * n + gi] = 0.0;
            }
        }
        // H⁻¹ -= H⁻¹[:, G] M⁻¹ H⁻¹[G, :]
        let cols: Vec<Vec<f64>> = (0..n)
            .map(|i| g.iter().map(|&gi| h_inv[i * n + gi]).collect())
            .collect();
        let scaled: Vec<Vec<f64>> = cols
            .iter()
            .map(|col| {
                (0..taps)
                    .map(|a| (0..taps).map(|b| col[b] * m_inv[b * taps + a]).sum())
                    .collect()
            })
            .collect();
        for i in 0..n {
            for j in 0..n {
                let d: f64 = scaled[i].iter().zip(&cols[j]).map(|(a, b)| a * b).sum();
                h_inv[i * n + j] -= d;
            }
        }
        alive[c] = false;
        order.push((c, cost));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system() {
        // [[4, 2], [2, 3]] x = [2, 1] -> x = [0.5, 0]
        let x = solve_spd(&[4.0, 2.0, 2.0, 3.0], &[2.0, 1.0], 2, 0.0).unwrap();
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1].abs() < 1e-12);
    }

    #[test]
    fn inverse_times_matrix_is_identity() {
        let a = [4.0, 2.0, 0.5, 2.0, 3.0, 0.25, 0.5, 0.25, 2.0];
        let inv = spd_inverse(&a, 3, 0.0).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let s: f64 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                assert!((s - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
    }

    /// The OBS update leaves the optimum of the reduced problem, and removes first the channel
    /// that the target does not depend on.
    #[test]
    fn obs_removes_the_unused_channel_and_refits_the_rest() {
        // Features x0, x1, x2 (one tap each) + bias; y = 2 x0 - x2 + 1 on fixed samples.
        let rows: Vec<[f64; 4]> = (0..40)
            .map(|i| {
                let t = f64::from(i);
                [
                    (t * 0.37).sin(),
                    (t * 0.91).cos(),
                    (t * 0.13).sin() + 0.3 * (t * 0.37).sin(),
                    1.0,
                ]
            })
            .collect();
        let y: Vec<f64> = rows.iter().map(|r| 2.0 * r[0] - r[2] + 1.0).collect();
        let n = 4;
        let mut ata = vec![0.0; n * n];
        let mut aty = vec![0.0; n];
        for (r, &t) in rows.iter().zip(&y) {
            for i in 0..n {
                aty[i] += r[i] * t;
                for j in 0..n {
                    ata[i * n + j] += r[i] * r[j];
                }
            }
        }
        let mut h_inv = spd_inverse(&ata, n, 0.0).unwrap();
        let mut w: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|j| h_inv[i * n + j] * aty[j]).sum())
            .collect();
        let mut w1 = w.clone();
        let mut h1 = h_inv.clone();
        let order = remove_channels_obs(&mut h1, &mut w1, n, 1, &mut [true; 3], 1);
        assert_eq!(order[0].0, 1);
        assert!(order[0].1 < 1e-9);
        assert!(
            (w1[0] - 2.0).abs() < 1e-6 && (w1[2] + 1.0).abs() < 1e-6 && (w1[3] - 1.0).abs() < 1e-6
        );
        // Removing a second channel costs what refitting without it leaves.
        let order = remove_channels_obs(&mut h_inv, &mut w, n, 1, &mut [true; 3], 2);
        assert_eq!(order[0].0, 1);
        assert!(order[1].1 > 1e-3);
    }
}
