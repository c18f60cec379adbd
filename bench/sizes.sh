#!/usr/bin/env bash
# Requests per second through each proxy as the response grows, from
# compare.sh's 19-byte body to 1 MiB: where buffer sizes and splice show.
# One proxy at a time, the order alternating each round (A B C D, D C B A);
# loopback only; bounded (about 5 minutes with the defaults); stops
# everything it started, also on Ctrl-C. Prints a Markdown table.
#
#   bench/sizes.sh                       # keep-alive, 3 rounds
#   WORKLOAD=close ROUNDS=5 bench/sizes.sh
#   TCPLB=/tmp/tcplb-other bench/sizes.sh
#
# Needs haproxy, nginx (with the stream module) and wrk: bench/compare.sh
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-3}
WORKERS=${WORKERS:-$(nproc)}
case ${WORKLOAD:-keep-alive} in
    close) HEADER="Connection: close" ;;
    keep-alive) HEADER="Connection: keep-alive" ;;
    *) echo "sizes.sh: WORKLOAD must be close or keep-alive, not '$WORKLOAD'" >&2; exit 2 ;;
esac
command -v wrk >/dev/null || { echo "sizes.sh: needs wrk (bench/compare.sh installs it)" >&2; exit 2; }
if [ -z "${TCPLB:-}" ]; then
    cargo build --release -q
    TCPLB=$PWD/target/release/tcplb
fi
PROXIES=(haproxy haproxy-splice nginx "$TCPLB")
for who in "${PROXIES[@]}"; do require_lb "$who"; done

one_lb_setup sizes
one() { # who path -> "req/s proxy-CPU" (µs per request), "0 nan" on failure
    local r cpu
    read -r r cpu _ _ < <(lb_run "$WORK" "$1" "$WORKERS" "$HEADER" "$2" "$DURATION")
    echo "$r $cpu"
}

: > "$WORK/rows"
for path in / $(for kib in $BODY_SIZES; do echo "/body/${kib}k"; done); do
    for round in $(seq 1 "$ROUNDS"); do
        round_order "$round" "${PROXIES[@]}"
        for who in "${ORDER[@]}"; do
            name=$who; [ "$who" = "$TCPLB" ] && name=tcplb
            echo "$path $round $name $(one "$who" "$path")" | tee -a "$WORK/rows" >&2
        done
    done
done

python3 - "$WORK/rows" "${WORKLOAD:-keep-alive}" <<'PY'
import math, statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
peers = ["haproxy", "haproxy-splice", "nginx"]
names = peers + ["tcplb"]
paths = list(dict.fromkeys(r[0] for r in rows))
def get(path, rnd, who, i):
    for r in rows:
        if r[0] == path and r[1] == rnd and r[2] == who:
            v = float(r[3 + i])
            return math.nan if (i == 0 and v == 0) else v
    return math.nan
def med(vs):
    vs = [v for v in vs if not math.isnan(v)]
    return statistics.median(vs) if vs else math.nan
def ratio(path, qs, i):  # tcplb / best of qs, per round, then the median
    rs = []
    for rnd in sorted({r[1] for r in rows if r[0] == path}):
        a = get(path, rnd, "tcplb", i)
        vs = [v for v in (get(path, rnd, q, i) for q in qs) if not math.isnan(v)]
        if math.isnan(a) or not vs:
            continue
        rs.append(a / max(vs) if i == 0 else min(vs) / a)  # CPU: > 1 means tcplb is cheaper
    return f"{statistics.median(rs):.2f}x" if rs else "-"
def size(p):
    return "19 B" if p == "/" else p.rsplit("/", 1)[1].replace("k", " KiB")
print(f"{sys.argv[2]}, medians of {len({r[1] for r in rows})} rounds: req/s (proxy CPU µs per request)\n")
print("| response | " + " | ".join(names) + " | tcplb / best peer | tcplb / best peer, CPU |")
print("|---|" + "---|" * (len(names) + 2))
for p in paths:
    cells = []
    for n in names:
        r = med(get(p, rnd, n, 0) for rnd in {r[1] for r in rows})
        c = med(get(p, rnd, n, 1) for rnd in {r[1] for r in rows})
        cells.append("-" if math.isnan(r) else f"{r:.0f} ({c:.1f})")
    print(f"| {size(p)} | " + " | ".join(cells) + f" | {ratio(p, peers, 0)} | {ratio(p, peers, 1)} |")
print("\nRatios are medians of per-round ratios; for CPU, > 1 means tcplb is cheaper.")
PY
