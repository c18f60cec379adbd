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
BIN=${BIN:-$(dirname "$0")/../target/release/tcplb}
ROUNDS=${ROUNDS:-16}
REDIS_N=${REDIS_N:-100000}
for tool in redis-server redis-benchmark; do
    command -v $tool >/dev/null || { echo "redis_defaults.sh: needs $tool (Debian: redis-server, redis-tools)" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "redis_defaults.sh: not an executable: $BIN (cargo build --release)" >&2; exit 2; }
SERVER=18601; DEFAULTS=18602; TUNED=18603
require_free_ports $SERVER $DEFAULTS $TUNED
WORK=$(mktemp -d /tmp/tcplb-redis.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/redis.pid" ] && kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
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
: > "$WORK/rounds"
for i in $(seq 1 "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then d=$(one $PID_D $DEFAULTS); t=$(one $PID_T $TUNED)
    else t=$(one $PID_T $TUNED); d=$(one $PID_D $DEFAULTS); fi
    echo "$i $d $t" | tee -a "$WORK/rounds"
done
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/rounds" <<'PY'
import sys
from median import show
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1])]
def ratios(i):
    return [r[i] / r[i + 3] for r in rows]
print(f"defaults / tuned over {len(rows)} rounds (medians of per-round ratios, [95% interval]): "
      f"SET req/s {show(ratios(0))}, GET req/s {show(ratios(1))}, proxy CPU for the same requests {show(ratios(2))}")
PY
