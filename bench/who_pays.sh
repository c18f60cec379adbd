#!/usr/bin/env bash
# Who pays for a connection through A and through B: the proxy, the client
# (wrk) and the backend (nginx), each in CPU µs a request, from /proc, with
# both proxies up and the rounds alternating as `TOGETHER=1 bench/ab.sh`
# runs them. ab.sh's whole-machine column says whether one proxy makes the
# machine spend more than its own CPU; this says on whom.
#
#   TCPLB_AS_SHIPPED=1 WORKLOAD=tls ROUNDS=20 bench/who_pays.sh haproxy target/release/tcplb
#   WORKLOAD=tls bench/who_pays.sh tuned:target/release/tcplb shipped:target/release/tcplb
#
# WORKLOAD: close (default) or tls, as in ab.sh; DURATION: seconds a run (3).
# Prints, per round, for A and B: req/s, then the proxy's, wrk's, the
# backend's and the whole machine's CPU µs a request; then the medians of
# the per-round B/A ratios with their 95% intervals.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

A=${1:?usage: bench/who_pays.sh PROXY_A PROXY_B}
B=${2:?usage: bench/who_pays.sh PROXY_A PROXY_B}
ROUNDS=${ROUNDS:-12}
DURATION=${DURATION:-3}
WORKLOAD=${WORKLOAD:-close}
WORKERS=${WORKERS:-$(nproc)}
URL_BASE=http://127.0.0.1:
case $WORKLOAD in
    close) ;;
    tls) URL_BASE=https://localhost: ;;
    *) echo "who_pays.sh: WORKLOAD must be close or tls, not '$WORKLOAD'" >&2; exit 2 ;;
esac
[ "$A" != "$B" ] || { echo "who_pays.sh: needs two different proxies" >&2; exit 2; }
case "$A $B" in *nginx*nginx*) echo "who_pays.sh: runs one nginx proxy at most" >&2; exit 2 ;; esac
for side in "$A" "$B"; do require_lb "$(bin_of "$side")"; done
command -v /usr/bin/time >/dev/null || { echo "who_pays.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 2; }

one_lb_setup who-pays
BACKEND_PID_FILE=$WORK/nginx-be.pid
if [ "$WORKLOAD" = tls ]; then tls_workload_setup; BACKEND_PID_FILE=$WORK/nginx-tls.pid; fi
LB_B=$((LB + 1))
require_free_ports $LB_B
mkdir -p "$WORK/a" "$WORK/b"
trap 'stop_lb "$WORK/a"; stop_lb "$WORK/b"; one_lb_cleanup' EXIT
start_side "$WORK/a" "$A" $LB; PIDS_A=$LB_PIDS
start_side "$WORK/b" "$B" $LB_B; PIDS_B=$LB_PIDS
# The backend's master and its workers (the workers do the work).
BACKEND_MASTER=$(cat "$BACKEND_PID_FILE")
BACKEND_PIDS="$BACKEND_MASTER $(pgrep -P "$BACKEND_MASTER" | tr '\n' ' ')"
for port in $LB $LB_B; do wrk -t1 -c50 -d1 -H "Connection: close" "$URL_BASE$port/" >/dev/null; done

one() { # PORT PROXY-PIDS -> "req/s proxy wrk backend machine"
    local c0 b0 m0 c1 b1 m1 out n w
    # shellcheck disable=SC2086 # one pid per word
    c0=$(cpu_ticks $2); b0=$(cpu_ticks $BACKEND_PIDS); m0=$(machine_busy_ticks)
    out=$(/usr/bin/time -f "wrk-cpu %U %S" wrk -t1 -c50 -d"$DURATION" --latency -H "Connection: close" "$URL_BASE$1/" 2>&1)
    # shellcheck disable=SC2086
    c1=$(cpu_ticks $2); b1=$(cpu_ticks $BACKEND_PIDS); m1=$(machine_busy_ticks)
    read -r _ _ _ n < <(echo "$out" | grep -v '^wrk-cpu' | wrk_parse)
    w=$(echo "$out" | awk '/^wrk-cpu/ { print ($2 + $3) * 1e6 }')
    awk -v n="$n" -v c=$((c1 - c0)) -v b=$((b1 - b0)) -v m=$((m1 - m0)) -v w="$w" -v us="$TICK_US" -v d="$DURATION" '
        BEGIN { if (n > 0) printf "%.0f %.1f %.1f %.1f %.1f\n", n / d, c * us / n, w / n, b * us / n, m * us / n
                else print "0 nan nan nan nan" }'
}

echo "round, then for A and B: req/s, CPU µs/request of the proxy, wrk, the backend and the whole machine ($WORKLOAD, $WORKERS workers)"
side_a() { one $LB "$PIDS_A"; }
side_b() { one $LB_B "$PIDS_B"; }
alternate_rounds "$ROUNDS" "$WORK/rounds" side_a side_b
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/rounds" <<'PY'
import sys
from median import ratios, rounds, show
pairs = rounds(sys.argv[1], 5, "who_pays.sh")
names = ["req/s", "proxy CPU", "wrk CPU", "backend CPU", "machine CPU"]
print(f"B/A over {len(pairs)} rounds (medians of per-round ratios, [95% interval of the median]; CPU a request, < 1: cheaper with B):")
for i, name in enumerate(names):
    print(f"  {name}: {show(ratios(pairs, i))}")
PY
