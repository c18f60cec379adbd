#!/usr/bin/env bash
# redis-benchmark through tcplb with its defaults (protocol auto, access
# log on) and tuned (protocol tcp, access log off), both running in front
# of one redis-server, rounds alternating which goes first: the defaults /
# tuned ratio for long-lived connections with small messages, which
# compare.sh's few rounds measure too coarsely (a round there swings by
# 10-20%). Loopback only; stops everything it started.
#
#   bench/redis_defaults.sh                          # 16 rounds
#   ROUNDS=24 REDIS_N=200000 BIN=/tmp/tcplb-old bench/redis_defaults.sh
#
# Each run is `redis-benchmark -c 50 -n REDIS_N -t set,get -d 1024`, as in
# compare.sh. Prints each round (SET and GET req/s and the proxy's CPU
# clock ticks for the run, defaults then tuned), then the medians of the
# per-round ratios with their 95% intervals.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
own_proxies redis_defaults.sh
BIN=${BIN:-$(dirname "$0")/../target/release/tcplb}
ROUNDS=${ROUNDS:-16}
REDIS_N=${REDIS_N:-100000}
for tool in redis-server redis-benchmark; do
    command -v $tool >/dev/null || { echo "redis_defaults.sh: needs $tool (Debian: redis-server, redis-tools)" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "redis_defaults.sh: not an executable: $BIN (cargo build --release)" >&2; exit 2; }
SERVER=18601; DEFAULTS=18602; TUNED=18603
require_free_ports $SERVER $DEFAULTS $TUNED
defaults_work redis redis.pid
redis-server --port $SERVER --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" >/dev/null
start_defaults_and_tuned "$WORK" "$BIN" $SERVER $DEFAULTS $TUNED redis
one() { # PID PORT -> "SET-req/s GET-req/s cpu-ticks"
    local c0 c1 out
    c0=$(cpu_ticks "$1")
    out=$(redis-benchmark -h 127.0.0.1 -p "$2" -c 50 -n "$REDIS_N" -t set,get -d 1024 --csv 2>&1 || true)
    c1=$(cpu_ticks "$1")
    awk -F'"' -v t=$((c1 - c0)) '$2 == "SET" { s = $4 } $2 == "GET" { g = $4 }
        END { if (s == "" || g == "") { print "redis-benchmark failed" > "/dev/stderr"; exit 1 } print s, g, t }' <<<"$out"
}
echo "round, then defaults and tuned: SET req/s, GET req/s, proxy CPU ticks ($REDIS_N requests each)"
with_defaults() { one $PID_D $DEFAULTS; }
tuned() { one $PID_T $TUNED; }
alternate_rounds "$ROUNDS" "$WORK/rounds" with_defaults tuned
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/rounds" <<'PY'
import sys
from median import rounds, show
pairs = rounds(sys.argv[1], 3, "redis_defaults.sh")
def ratios(i):
    return [d[i] / t[i] for d, t in pairs]
print(f"defaults / tuned over {len(pairs)} rounds (medians of per-round ratios, [95% interval]): "
      f"SET req/s {show(ratios(0))}, GET req/s {show(ratios(1))}, proxy CPU for the same requests {show(ratios(2))}")
PY
