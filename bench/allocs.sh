#!/usr/bin/env bash
# Heap allocations per connection in one proxy while it carries a wrk run
# (conn-close, or WORKLOAD=tls: compare.sh's TLS-by-SNI workload): perf
# uprobes on libc's malloc, realloc, calloc and posix_memalign, counted in
# the proxy's processes for 2 s in the middle of a 6 s run. Counts, not
# times: they do not move with the shared machine's load, so a change of
# one allocation a connection shows where a CPU A/B cannot. Loopback only;
# stops everything it started and removes the probes it added.
#
#   bench/allocs.sh target/release/tcplb           # tcplb as shipped (its defaults)
#   WORKLOAD=tls bench/allocs.sh target/release/tcplb
#   bench/allocs.sh nginx                          # or haproxy
#
# Needs perf (Debian: linux-perf) with uprobes (root), nginx, wrk.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
WHO=${1:?usage: bench/allocs.sh nginx|haproxy|TCPLB_BINARY}
WORKERS=${WORKERS:-$(nproc)}
URL_BASE=http://127.0.0.1:
case ${WORKLOAD:=close} in
    close) ;;
    tls) URL_BASE=https://localhost: ;;
    *) echo "allocs.sh: WORKLOAD must be close or tls, not '$WORKLOAD'" >&2; exit 2 ;;
esac
for tool in perf nginx wrk; do
    command -v $tool >/dev/null || { echo "allocs.sh: needs $tool" >&2; exit 2; }
done
require_lb "$WHO"
LIBC=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64|libc\.so\.6 \(libc6,x86-64/ {print $NF; exit}')
[ -n "$LIBC" ] || LIBC=$(ldconfig -p | awk '/libc\.so\.6/ {print $NF; exit}')
FUNCS="malloc realloc calloc posix_memalign"

export TCPLB_AS_SHIPPED=${TCPLB_AS_SHIPPED:-1}
one_lb_setup allocs
PROBES=()
cleanup() {
    for p in "${PROBES[@]}"; do perf probe -q -d "$p" 2>/dev/null || true; done
    one_lb_cleanup
}
trap cleanup EXIT
if [ "$WORKLOAD" = tls ]; then tls_workload_setup; fi
EVENTS=()
for f in $FUNCS; do
    name="tcplb_allocs_$f"
    perf probe -q -x "$LIBC" -a "$name=$f" 2>/dev/null || { echo "allocs.sh: cannot add a uprobe on $LIBC:$f (root? perf with uprobes?)" >&2; exit 2; }
    PROBES+=("probe_libc:$name")
    EVENTS+=(-e "probe_libc:$name")
done
start_lb "$WORK" "$WHO" "$WORKERS" $LB $B1 $B2

wrk -t1 -c50 -d6 -H "Connection: close" "$URL_BASE$LB/" > "$WORK/wrk.out" & WRK=$!
sleep 2
PIDS=$(echo $LB_PIDS | tr ' ' ,)
perf stat -x, "${EVENTS[@]}" -p "$PIDS" -o "$WORK/stat.csv" -- sleep 2 2>/dev/null
wait $WRK
RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
echo "$RPS connections/s through $(basename "$WHO") ($WORKLOAD), counted for 2 s"
echo
echo "| call | per connection |"
echo "|---|---|"
awk -F, -v n="$RPS" '/probe_libc:tcplb_allocs_/ {sub(/.*tcplb_allocs_/, "", $3); printf "| %s | %.2f |\n", $3, $1 / (n * 2); t += $1} END {printf "| all | %.2f |\n", t / (n * 2)}' "$WORK/stat.csv"
