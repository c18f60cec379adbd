#!/usr/bin/env bash
# A/B of two tcplb builds, or of tcplb and nginx or HAProxy, for effects too
# small for compare.sh (a few %): many short rounds, the order of the two
# alternating (A B, B A, ...) because whichever runs second in a pair is
# favoured by about 2% here. Loopback only; one proxy runs at a time; stops
# everything it started.
#
#   bench/ab.sh /tmp/tcplb-before target/release/tcplb          # conn-close, 12 rounds
#   ROUNDS=16 WORKLOAD=keep-alive bench/ab.sh A B
#   bench/ab.sh nginx target/release/tcplb     # head to head with nginx stream
#   bench/ab.sh haproxy target/release/tcplb   # or HAProxy (mode tcp)
#   WORKERS=1 bench/ab.sh nginx target/release/tcplb   # one worker each
#   URL_PATH=/body/64k bench/ab.sh haproxy-splice target/release/tcplb
#   TOGETHER=1 ROUNDS=40 bench/ab.sh A B   # both stay up, 2 s rounds
#   WORKLOAD=tls bench/ab.sh nginx target/release/tcplb   # new TLS connections routed by SNI
#   TCPLB_AS_SHIPPED=1 bench/ab.sh A B   # tcplb with its defaults (auto, access log), not tuned
#   TOGETHER=1 bench/ab.sh tuned:target/release/tcplb shipped:target/release/tcplb   # defaults over tuned
#   TOGETHER=1 bench/ab.sh floor target/release/tcplb   # against bench/floor, the least a tokio relay does
#   PIN=1 TOGETHER=1 WORKLOAD=tls bench/ab.sh haproxy target/release/tcplb   # the proxy on a core of its own
#   CAP=0.25 TOGETHER=1 WORKLOAD=tls bench/ab.sh nginx target/release/tcplb   # each proxy held to a quarter of a core
#
# WORKERS (default: cores) is tcplb's --threads and nginx's worker_processes;
# NGINX_HALF_CLOSE=1 runs nginx with proxy_half_close on: the client's bytes
# after the backend's FIN still reach the backend, as through tcplb (nginx's
# default closes both sockets at the first FIN and drops them).
# NGINX_REUSEPORT=1 gives each nginx worker its own SO_REUSEPORT socket, as
# tcplb's workers have, instead of one shared socket. PIN=1 runs the
# proxies on the last core and wrk and the backends on the others (one
# worker each unless WORKERS says otherwise; bench/lib.sh). CAP=F holds each
# proxy to F of a core (a cgroup CPU quota; bench/lib.sh), so that the
# proxy, not the client, sets the rate. PEER_LOG=1 gives
# nginx and HAProxy an access log, for a like-for-like comparison with
# tcplb's defaults (TCPLB_AS_SHIPPED=1, whose access log is on). URL_PATH (default /,
# a 19-byte body) may ask for a larger body: /body/1k ... /body/1024k
# (BODY_SIZES in bench/lib.sh). WORKLOAD=tls is compare.sh's TLS workload:
# a new TLS connection (TLS 1.3, resumed) and one request each, through a
# balancer that routes the name "localhost" by SNI without terminating TLS
# to one nginx that does.
#
# TOGETHER=1 starts A and B once, on two ports, and keeps both up: a round
# is then two short wrk runs (DURATION defaults to 2 s) a few seconds apart
# instead of two proxy starts ~15 s apart, so a pair is measured in the same
# phase of the shared machine's load (which here changes every few rounds by
# up to 30%). Only the loaded proxy uses CPU; the idle one sleeps in epoll.
#
# A tcplb binary may be prefixed `shipped:` (its own defaults) or `tuned:`
# (tcplb_defaults' tuning), which sets TCPLB_AS_SHIPPED for that side alone:
# the same build against itself measures what its defaults cost.
#
# Prints, per round, for A and B: req/s, the proxy's CPU µs per request (user
# + system from /proc) and the whole machine's (client and backends too: what
# the proxy costs everything sharing the cores), then the medians of the
# per-round B/A ratios.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
A=${1:?usage: bench/ab.sh BINARY_A BINARY_B}
B=${2:?usage: bench/ab.sh BINARY_A BINARY_B}
ROUNDS=${ROUNDS:-12}
TOGETHER=${TOGETHER:-0}
DURATION=${DURATION:-$([ "$TOGETHER" = 1 ] && echo 2 || echo 5)}
WORKLOAD=${WORKLOAD:-close}
URL_BASE=http://127.0.0.1:
case $WORKLOAD in
    close) HEADER="Connection: close" ;;
    keep-alive) HEADER="Connection: keep-alive" ;;
    tls) HEADER="Connection: close"; URL_BASE=https://localhost: ;;
    *) echo "ab.sh: WORKLOAD must be close, keep-alive or tls, not '$WORKLOAD'" >&2; exit 2 ;;
esac
WORKERS=${WORKERS:-$(nproc)}
URL_PATH=${URL_PATH:-/}
for side in "$A" "$B"; do
    require_lb "$(bin_of "$side")"
done
for tool in nginx wrk; do
    command -v $tool >/dev/null || { echo "ab.sh: needs $tool (bench/compare.sh installs it)" >&2; exit 2; }
done

one_lb_setup ab
if [ "$WORKLOAD" = tls ]; then tls_workload_setup; fi
one() { # tcplb binary, nginx or haproxy -> "req/s proxy-CPU machine-CPU p99"
    TCPLB_AS_SHIPPED=$(shipped_of "$1") lb_run "$WORK" "$(bin_of "$1")" "$WORKERS" "$HEADER" "$URL_PATH" "$DURATION"
}
if [ "$TOGETHER" = 1 ]; then
    [ "$A" != "$B" ] || { echo "ab.sh: TOGETHER=1 needs two different proxies" >&2; exit 2; }
    case "$A $B" in *nginx*nginx*) echo "ab.sh: TOGETHER=1 runs one nginx at most" >&2; exit 2 ;; esac
    LB_B=$((LB + 1))
    require_free_ports $LB_B
    mkdir -p "$WORK/a" "$WORK/b"
    # one_lb_cleanup stops the backends (TLS too): killing the TLS one here as
    # well raced its own removal of its pid file.
    trap 'stop_lb "$WORK/a"; stop_lb "$WORK/b"; one_lb_cleanup' EXIT
    start_side "$WORK/a" "$A" $LB; PIDS_A=$LB_PIDS
    start_side "$WORK/b" "$B" $LB_B; PIDS_B=$LB_PIDS
    for port in $LB $LB_B; do wrk -t1 -c50 -d1 -H "$HEADER" "$URL_BASE$port$URL_PATH" >/dev/null; done
    one() { # A or B (already running) -> "req/s proxy-CPU machine-CPU p99"
        local port=$LB pids=$PIDS_A r p99 cpu mach
        [ "$1" = "$B" ] && port=$LB_B pids=$PIDS_B
        # shellcheck disable=SC2086 # one pid per word
        read -r r _ p99 cpu mach < <(wrk_measured "$URL_BASE$port$URL_PATH" "$HEADER" "$DURATION" $pids)
        echo "$r $cpu $mach $p99"
    }
fi

echo "round, then for A and B: req/s, proxy CPU µs/request, whole-machine busy CPU µs/request, p99 latency ms ($WORKLOAD, $URL_PATH, $WORKERS workers)"
side_a() { one "$A"; }
side_b() { one "$B"; }
alternate_rounds "$ROUNDS" "$WORK/rounds" side_a side_b
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/rounds" <<'PY'
import sys
from median import ratios, rounds, show
pairs = rounds(sys.argv[1], 4, "ab.sh")
print(f"B/A over {len(pairs)} rounds (medians of per-round ratios, [95% interval of the median]): "
      f"req/s {show(ratios(pairs, 0))}, proxy CPU per request {show(ratios(pairs, 1))}, "
      f"machine CPU per request {show(ratios(pairs, 2))}, "
      f"p99 latency {show(ratios(pairs, 3))} (CPU and latency < 1: B is cheaper or faster)")
PY
