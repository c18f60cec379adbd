#!/usr/bin/env bash
# A/B of two tcplb builds for effects too small for compare.sh (a few %):
# many short rounds, the order of the two builds alternating (A B, B A, ...)
# because whichever runs second in a pair is favoured by about 2% here.
# Loopback only; one build runs at a time; stops everything it started.
#
#   bench/ab.sh /tmp/tcplb-before target/release/tcplb          # conn-close, 12 rounds
#   ROUNDS=16 WORKLOAD=keep-alive bench/ab.sh A B
#
# Prints, per round, req/s and the proxy's CPU µs per request (user + system
# from /proc) for A and B, then the medians of the per-round B/A ratios.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=${1:?usage: bench/ab.sh BINARY_A BINARY_B}
B=${2:?usage: bench/ab.sh BINARY_A BINARY_B}
ROUNDS=${ROUNDS:-12}
DURATION=${DURATION:-5}
WORKLOAD=${WORKLOAD:-close}
case $WORKLOAD in
    close) HEADER="Connection: close" ;;
    keep-alive) HEADER="Connection: keep-alive" ;;
    *) echo "ab.sh: WORKLOAD must be close or keep-alive, not '$WORKLOAD'" >&2; exit 2 ;;
esac
for bin in "$A" "$B"; do
    [ -x "$bin" ] || { echo "ab.sh: not an executable: $bin" >&2; exit 2; }
done
for tool in nginx wrk; do
    command -v $tool >/dev/null || { echo "ab.sh: needs $tool (bench/compare.sh installs it)" >&2; exit 2; }
done

B1=18481; B2=18482; LB=18484
require_free_ports $B1 $B2 $LB

WORK=$(mktemp -d /tmp/tcplb-ab.XXXXXX)
LB_PID=""
cleanup() {
    [ -n "$LB_PID" ] && kill "$LB_PID" 2>/dev/null || true
    [ -f "$WORK/nginx-be.pid" ] && kill "$(cat "$WORK/nginx-be.pid")" 2>/dev/null || true
    sleep 0.3
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_http_backends "$WORK" $B1 $B2
cat > "$WORK/lb.toml" <<CONF
$(tcplb_defaults)
[[listener]]
name = "http"
listen = "127.0.0.1:$LB"
upstreams = ["127.0.0.1:$B1", "127.0.0.1:$B2"]
CONF

one() { # binary -> "req/s cpu-us-per-request"
    "$1" --config "$WORK/lb.toml" --log-level warn & LB_PID=$!
    sleep 0.5
    wrk -t1 -c50 -d1 -H "$HEADER" "http://127.0.0.1:$LB/" >/dev/null # warm-up
    local c0 c1
    c0=$(cpu_ticks "$LB_PID")
    wrk -t1 -c50 -d"$DURATION" -H "$HEADER" "http://127.0.0.1:$LB/" > "$WORK/wrk.out"
    c1=$(cpu_ticks "$LB_PID")
    kill "$LB_PID"; wait "$LB_PID" 2>/dev/null || true; LB_PID=""
    awk -v t=$((c1 - c0)) -v us="$TICK_US" '
        /requests in/ { n = $1 } /Requests\/sec/ { r = $2 }
        END { if (n > 0) printf "%s %.1f\n", r, t * us / n; else print "0 nan" }' "$WORK/wrk.out"
}

echo "round A_req/s A_cpu_us B_req/s B_cpu_us ($WORKLOAD)"
: > "$WORK/rounds"
for i in $(seq 1 "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then a=$(one "$A"); b=$(one "$B"); else b=$(one "$B"); a=$(one "$A"); fi
    echo "$i $a $b" | tee -a "$WORK/rounds"
done
python3 - "$WORK/rounds" <<'PY'
import math, statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]
rows = [r for r in rows if r[0] > 0 and r[2] > 0 and not math.isnan(r[1] + r[3])]
if not rows:
    sys.exit("ab.sh: no round measured anything")
rps = statistics.median(r[2] / r[0] for r in rows)
cpu = statistics.median(r[3] / r[1] for r in rows)
print(f"B/A over {len(rows)} rounds (medians of per-round ratios): "
      f"req/s {rps:.3f}x, CPU per request {cpu:.3f}x (< 1: B is cheaper)")
PY
