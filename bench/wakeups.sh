#!/usr/bin/env bash
# Who wakes whom, how often each process is switched out and who preempts
# it, per request (the proxy's threads by name),
# while one proxy carries a wrk run (conn-close, WORKLOAD=keep-alive, or
# WORKLOAD=tls: new TLS connections routed by SNI, as in ab.sh): perf's sched tracepoints,
# system-wide, for 2 s in the middle of a 6 s run. On a machine where client,
# proxy and backends share the cores, these switches are part of what a
# proxy costs. Loopback only; stops everything it started.
#
#   bench/wakeups.sh nginx                  # nginx stream (or haproxy)
#   bench/wakeups.sh target/release/tcplb
#   WORKERS=1 bench/wakeups.sh nginx        # workers (default: cores)
#   WORKLOAD=keep-alive bench/wakeups.sh haproxy
#   WORKLOAD=tls bench/wakeups.sh target/release/tcplb   # the backend is the TLS nginx
#
# Needs perf (Debian: linux-perf) with access to tracepoints (root), nginx, wrk.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
WHO=${1:?usage: bench/wakeups.sh nginx|haproxy|TCPLB_BINARY}
WORKERS=${WORKERS:-$(nproc)}
URL_BASE=http://127.0.0.1:
case ${WORKLOAD:-close} in
    close) HEADER="Connection: close" ;;
    keep-alive) HEADER="Connection: keep-alive" ;;
    tls) HEADER="Connection: close"; URL_BASE=https://localhost: ;;
    *) echo "wakeups.sh: WORKLOAD must be close, keep-alive or tls, not '$WORKLOAD'" >&2; exit 2 ;;
esac
for tool in perf nginx wrk; do
    command -v $tool >/dev/null || { echo "wakeups.sh: needs $tool" >&2; exit 2; }
done
require_lb "$WHO"

one_lb_setup wakeups
if [ "${WORKLOAD:-close}" = tls ]; then tls_workload_setup; fi
start_lb "$WORK" "$WHO" "$WORKERS" $LB $B1 $B2
tids() { for p in "$@"; do ls "/proc/$p/task"; done | tr '\n' ' '; }
BE=$(cat "$WORK/nginx-be.pid")
if [ "${WORKLOAD:-close}" = tls ]; then BE=$(cat "$WORK/nginx-tls.pid"); fi
ROLES="proxy=$(tids $LB_PIDS | tr ' ' ,) backend=$(tids $BE $(pgrep -P "$BE" || true) | tr ' ' ,)"

wrk -t1 -c50 -d6 -H "$HEADER" "$URL_BASE$LB/" > "$WORK/wrk.out" & WRK=$!
sleep 2
perf record -q -a -e sched:sched_wakeup,sched:sched_switch -o "$WORK/perf.data" -- sleep 2 2>/dev/null
wait $WRK
perf script -i "$WORK/perf.data" -F comm,tid,event,trace 2>/dev/null > "$WORK/trace.txt"
RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")

python3 - "$WORK/trace.txt" "$RPS" "$ROLES" "$(basename "$WHO")" <<'PY'
import collections, re, sys
trace, rps, roles = sys.argv[1], float(sys.argv[2]), sys.argv[3]
requests = rps * 2  # the trace covers 2 s
role = {}
for item in roles.split():
    name, tids = item.split("=")
    role.update((t, name) for t in tids.split(",") if t)
def who(tid, comm):
    if tid in role:
        # The proxy's threads by name: a worker, the log writer, the control plane.
        return f"{role[tid]} ({comm})" if role[tid] == "proxy" else role[tid]
    return re.sub(r"[/:-]\d+$", "", comm)  # ksoftirqd/0, swapper/1, kworker/u8:3 ...
wakes, outs, takers = collections.Counter(), collections.Counter(), collections.Counter()
for line in open(trace):
    m = re.match(r"\s*(\S+)\s+(\d+)\s+sched:(sched_wakeup|sched_switch):\s*(.*)", line)
    if not m:
        continue
    comm, tid, event, rest = m.groups()
    if event == "sched_wakeup":
        wakee = re.search(r"comm=(\S+) pid=(\d+)", rest)
        wakes[(who(tid, comm), who(wakee.group(2), wakee.group(1)))] += 1
    else:
        prev = re.search(r"prev_comm=(\S+) prev_pid=(\d+) .*prev_state=(\S+)", rest)
        nxt = re.search(r"next_comm=(\S+) next_pid=(\d+)", rest)
        how = "preempted" if prev.group(3).startswith("R") else "slept"
        outs[(who(prev.group(2), prev.group(1)), how)] += 1
        if how == "preempted":
            takers[(who(prev.group(2), prev.group(1)), who(nxt.group(2), nxt.group(1)))] += 1
print(f"{rps:.0f} req/s through {sys.argv[4]}, traced for 2 s\n")
print("| waker | woken | per request |\n|---|---|---|")
for (a, b), n in wakes.most_common(8):
    print(f"| {a} | {b} | {n / requests:.3f} |")
print("\n| switched out | how | per request |\n|---|---|---|")
for (a, how), n in outs.most_common(8):
    print(f"| {a} | {how} | {n / requests:.3f} |")
print("\n| preempted | by | per request |\n|---|---|---|")
for (a, b), n in takers.most_common(8):
    print(f"| {a} | {b} | {n / requests:.3f} |")
print(f"\ncontext switches per request, all processes: {sum(outs.values()) / requests:.2f}")
PY
