#!/usr/bin/env python3
"""Where one inference's guest instructions go, per function.

    profile.py IMAGE.elf BASE.pcs INFER.pcs [--inline] [--top N]

BASE.pcs and INFER.pcs are the per-address counts that the insn.so plugin writes with
pcs=PATH for two runs of IMAGE (scripts/profile-m4.sh: `base` and `infer` modes of
firmware/bench-m4); the difference is the inference. Addresses are attributed to the ELF's
function symbols (arm-none-eabi-nm); with --inline, to the innermost inlined function and
its caller as well (arm-none-eabi-addr2line -i, needs the image built with debug info)."""
import argparse
import bisect
import collections
import subprocess
import sys


def load(path):
    counts = {}
    with open(path) as f:
        for line in f:
            addr, n = line.split()
            counts[int(addr, 16)] = int(n)
    return counts


def symbols(elf):
    out = subprocess.run(["arm-none-eabi-nm", "-C", "-S", "--defined-only", elf],
                         capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[2] in "tTwW":
            syms.append((int(parts[0], 16) & ~1, int(parts[1], 16), parts[3]))
    syms.sort()
    return syms


def inline_chains(elf, addrs):
    """addr -> 'innermost < caller' from addr2line's inlining frames."""
    chains = {}
    for i in range(0, len(addrs), 2000):
        batch = addrs[i:i + 2000]
        out = subprocess.run(["arm-none-eabi-addr2line", "-e", elf, "-i", "-f", "-C", "-a"]
                             + [hex(a) for a in batch], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        cur, k = None, 0
        for line in out:
            if line.startswith("0x"):
                cur, k = int(line, 16), 0
                chains[cur] = []
                continue
            if k % 2 == 0:  # function lines; odd lines are file:line
                chains[cur].append(line.rsplit("::", 1)[-1])
            k += 1
    return {a: " < ".join(c[:2]) for a, c in chains.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("elf")
    ap.add_argument("base")
    ap.add_argument("infer")
    ap.add_argument("--inline", action="store_true", help="attribute to inlined functions too")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    base, infer = load(a.base), load(a.infer)
    diff = {p: infer.get(p, 0) - base.get(p, 0) for p in set(base) | set(infer)}
    diff = {p: n for p, n in diff.items() if n}
    total = sum(diff.values())
    syms = symbols(a.elf)
    starts = [s[0] for s in syms]
    per_fn = collections.Counter()
    for p, n in diff.items():
        k = bisect.bisect_right(starts, p) - 1
        inside = k >= 0 and p < syms[k][0] + max(syms[k][1], 2)
        per_fn[syms[k][2] if inside else "?"] += n
    print(f"{total:>12}  instructions of one inference (infer - base)")
    for name, n in per_fn.most_common(a.top):
        print(f"{n:>12}  {100 * n / total:5.1f}%  {name}")
    if a.inline:
        chains = inline_chains(a.elf, sorted(diff))
        per_chain = collections.Counter()
        for p, n in diff.items():
            per_chain[chains.get(p, "?")] += n
        print("\nby inlined function < caller:")
        for name, n in per_chain.most_common(a.top):
            print(f"{n:>12}  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
