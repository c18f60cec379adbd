#!/usr/bin/env bash
# One iperf3 stream through tcplb with its defaults (protocol auto, access
# log on) and tuned (protocol tcp, access log off), both running, rounds
# alternating which goes first: the defaults / tuned ratio for one stream,
# which compare.sh's few rounds measure too coarsely (a single round there
# swings by 20%). Loopback only; stops everything it started.
#
#   bench/bulk_defaults.sh                  # upload (client sends, server silent), 10 rounds
#   DIRECTION=download bench/bulk_defaults.sh
#   STREAMS=8 bench/bulk_defaults.sh        # iperf3 -P 8, as compare.sh's 8-stream rows
#   ROUNDS=16 SECONDS_EACH=5 BIN=/tmp/tcplb-old bench/bulk_defaults.sh
#   AGAINST=haproxy-splice bench/bulk_defaults.sh   # the defaults against a peer instead
#
# AGAINST (default: tuned) is what the defaults are measured against:
# tcplb tuned, or a peer bench/lib.sh's start_lb knows (haproxy-splice,
# haproxy, nginx) with as many workers as cores. Prints each round (Gbit/s
# and the proxy's CPU ms per GB moved), then the medians of the per-round
# ratios with their 95% intervals.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-$(dirname "$0")/../target/release/tcplb}
ROUNDS=${ROUNDS:-10}
SECONDS_EACH=${SECONDS_EACH:-3}
DIRECTION=${DIRECTION:-upload}
STREAMS=${STREAMS:-1}
AGAINST=${AGAINST:-tuned}
case $DIRECTION in
    upload) REVERSE="" ;;
    download) REVERSE="-R" ;;
    *) echo "bulk_defaults.sh: DIRECTION must be upload or download, not '$DIRECTION'" >&2; exit 2 ;;
esac
command -v iperf3 >/dev/null || { echo "bulk_defaults.sh: needs iperf3 (bench/compare.sh installs it)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "bulk_defaults.sh: not an executable: $BIN (cargo build --release)" >&2; exit 2; }
SERVER=18301; DEFAULTS=18302; TUNED=18303; PEER=18304
require_free_ports $SERVER $DEFAULTS $TUNED $PEER
defaults_work bulk iperf.pid
iperf3 -s -p $SERVER -D --pidfile "$WORK/iperf.pid"
# No health checks: a tcp probe holds iperf3's one client slot meanwhile.
start_defaults_and_tuned "$WORK" "$BIN" $SERVER $DEFAULTS $TUNED bulk $'[listener.health]\ncheck = "none"\n'
# What the defaults are measured against: its processes and its port.
OTHER_PIDS=$PID_T; OTHER_PORT=$TUNED
if [ "$AGAINST" != tuned ]; then
    require_lb "$AGAINST"
    mkdir "$WORK/peer"
    # Both of its backends are the one iperf3 server.
    start_lb "$WORK/peer" "$AGAINST" "$(nproc)" $PEER $SERVER $SERVER
    PIDS+=("$LB_PID")
    OTHER_PIDS=$LB_PIDS; OTHER_PORT=$PEER
fi
one() { # "PID..." PORT -> "Gbit/s CPU-ms/GB", then a second's pause
    local c0 c1 out
    # shellcheck disable=SC2086 # the peer's processes, one word each
    c0=$(cpu_ticks $1)
    out=$(iperf3 -c 127.0.0.1 -p "$2" -t "$SECONDS_EACH" -P "$STREAMS" $REVERSE -J | python3 -c '
import json, sys
d = json.load(sys.stdin)["end"]["sum_received"]
print(d["bits_per_second"] / 1e9, d["bytes"])')
    # shellcheck disable=SC2086
    c1=$(cpu_ticks $1)
    awk -v ms=$(( (c1 - c0) * 1000 / $(getconf CLK_TCK) )) '{printf "%.2f %.0f\n", $1, ms / ($2 / 1e9)}' <<<"$out"
    sleep 1
}
echo "round, then defaults and $AGAINST: Gbit/s, proxy CPU ms/GB ($DIRECTION, $STREAMS stream(s), ${SECONDS_EACH}s)"
with_defaults() { one $PID_D $DEFAULTS; }
against() { one "$OTHER_PIDS" $OTHER_PORT; }
alternate_rounds "$ROUNDS" "$WORK/rounds" with_defaults against
PYTHONPATH="$(dirname "$0")" python3 - "$WORK/rounds" "$AGAINST" <<'PY'
import sys
from median import ratios, rounds, show, swapped
pairs = swapped(rounds(sys.argv[1], 2, "bulk_defaults.sh"))
print(f"defaults / {sys.argv[2]} over {len(pairs)} rounds (medians of per-round ratios, [95% interval]): "
      f"Gbit/s {show(ratios(pairs, 0))}, proxy CPU per GB {show(ratios(pairs, 1))}")
PY
