"""The median of per-round ratios and its 95% interval, for the bench scripts."""
import math
import statistics
import sys


def ci(xs):
    """Distribution-free 95% interval of the median: the order statistics
    whose ranks bound it (binomial, p = 1/2); None for fewer than 6 rounds."""
    xs, n = sorted(xs), len(xs)
    cdf, k, total = 0.0, 0, 2.0 ** n
    while k < n:
        cdf += math.comb(n, k) / total
        if cdf > 0.025:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


def rounds(path, width, script):
    """The (A, B) figures of each round of a file of "ROUND A... B..." lines
    with `width` figures a side (other lines, such as a saved run's log
    lines, are passed over), leaving out rounds where either side measured
    nothing (a first figure of 0, or a nan); exits naming `script` when none
    is left."""
    pairs = []
    for line in open(path):
        f = line.split()
        if len(f) != 1 + 2 * width or not f[0].isdigit():
            continue
        r = list(map(float, f[1:]))
        if r[0] > 0 and r[width] > 0 and not math.isnan(sum(r)):
            pairs.append((r[:width], r[width:]))
    if not pairs:
        sys.exit(f"{script}: no round measured anything")
    return pairs


def ratios(pairs, i):
    """The per-round B/A ratios of figure `i`."""
    return [b[i] / a[i] for a, b in pairs]


def swapped(pairs):
    """The same rounds with A and B exchanged (their ratios then read A/B)."""
    return [(b, a) for a, b in pairs]


def show(xs):
    """`1.012x [0.990-1.034]`: the median, then its interval when there is one."""
    lo_hi = ci(xs)
    return f"{statistics.median(xs):.3f}x" + (f" [{lo_hi[0]:.3f}-{lo_hi[1]:.3f}]" if lo_hi else "")


def pooled(first, second):
    """One comparison from two saved `ab.sh` outputs, `ab.sh X Y` then
    `ab.sh Y X`: Y over X for each figure, from both runs' rounds together
    (the second run's ratios inverted), so that the favour whichever side
    runs second gets cancels out."""
    a, b = rounds(first, 4, "median.py pool"), rounds(second, 4, "median.py pool")
    names = ["req/s", "proxy CPU per request", "machine CPU per request", "p99 latency"]
    print(f"pooled over {len(a)} + {len(b)} rounds, the second side of the first run over the first: "
          + ", ".join(f"{n} {show(ratios(a, i) + ratios(swapped(b), i))}" for i, n in enumerate(names)))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "pool":
        sys.exit("usage: python3 bench/median.py pool AB_OUTPUT BA_OUTPUT")
    pooled(sys.argv[2], sys.argv[3])
