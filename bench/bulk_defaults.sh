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
#
# Prints each round (Gbit/s and the proxy's CPU ms per GB moved), then the
# median of the per-round ratios with the lowest and highest.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-$(dirname "$0")/../target/release/tcplb}
ROUNDS=${ROUNDS:-10}
SECONDS_EACH=${SECONDS_EACH:-3}
DIRECTION=${DIRECTION:-upload}
STREAMS=${STREAMS:-1}
case $DIRECTION in
    upload) REVERSE="" ;;
    download) REVERSE="-R" ;;
    *) echo "bulk_defaults.sh: DIRECTION must be upload or download, not '$DIRECTION'" >&2; exit 2 ;;
esac
command -v iperf3 >/dev/null || { echo "bulk_defaults.sh: needs iperf3 (bench/compare.sh installs it)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "bulk_defaults.sh: not an executable: $BIN (cargo build --release)" >&2; exit 2; }
SERVER=18301; DEFAULTS=18302; TUNED=18303
require_free_ports $SERVER $DEFAULTS $TUNED
defaults_work bulk iperf.pid
iperf3 -s -p $SERVER -D --pidfile "$WORK/iperf.pid"
# No health checks: a tcp probe holds iperf3's one client slot meanwhile.
start_defaults_and_tuned "$WORK" "$BIN" $SERVER $DEFAULTS $TUNED bulk $'[listener.health]\ncheck = "none"\n'
one() { # NAME PID PORT -> "NAME Gbit/s bytes cpu-ms"
    local c0 c1 out
    c0=$(cpu_ticks "$2")
    out=$(iperf3 -c 127.0.0.1 -p "$3" -t "$SECONDS_EACH" -P "$STREAMS" $REVERSE -J | python3 -c '
import json, sys
d = json.load(sys.stdin)["end"]["sum_received"]
print(d["bits_per_second"] / 1e9, d["bytes"])')
    c1=$(cpu_ticks "$2")
    echo "$1 $out $(( (c1 - c0) * 1000 / $(getconf CLK_TCK) ))"
}
echo "round, then defaults and tuned: Gbit/s, proxy CPU ms/GB ($DIRECTION, $STREAMS stream(s), ${SECONDS_EACH}s)"
: > "$WORK/rounds"
for i in $(seq 1 "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then d=$(one defaults $PID_D $DEFAULTS); sleep 1; t=$(one tuned $PID_T $TUNED)
    else t=$(one tuned $PID_T $TUNED); sleep 1; d=$(one defaults $PID_D $DEFAULTS); fi
    echo "$d $t" >> "$WORK/rounds"
    echo "$d $t" | awk -v i="$i" '{printf "%d %.2f %.0f %.2f %.0f\n", i, $2, $4 / ($3 / 1e9), $6, $8 / ($7 / 1e9)}'
    sleep 1
done
python3 - "$WORK/rounds" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
gbit = sorted(float(r[1]) / float(r[5]) for r in rows)
cpu = sorted((int(r[3]) / int(r[2])) / (int(r[7]) / int(r[6])) for r in rows)
print("defaults / tuned over %d rounds (median, lowest-highest): Gbit/s %.3fx (%.2f-%.2f), proxy CPU per GB %.3fx (%.2f-%.2f)"
      % (len(rows), statistics.median(gbit), gbit[0], gbit[-1], statistics.median(cpu), cpu[0], cpu[-1]))
PY
