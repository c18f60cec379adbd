#!/usr/bin/env bash
# What active health checks cost at scale: tcplb probing BACKENDS backends
# (default 1000, all on 127.0.0.1, one Python asyncio process serving every
# port) every INTERVAL (default 1s) with CHECK (tcp, redis or http:/, all
# default tcp), for SECONDS (default 30) after a warm-up of two intervals.
#
#   bench/probes.sh                       # 1000 backends, tcp, 1 s
#   CHECK=redis bench/probes.sh           # PING / +PONG dialogues
#   BACKENDS=200 CHECK=http:/ bench/probes.sh
#
# Prints tcplb's CPU (user + system, from /proc) as a share of one core and
# per probe, its resident memory, and how evenly the probes arrive: probes
# per 100 ms window at the backends, median and maximum (a burst shows as a
# maximum far above the median). Loopback only; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKENDS=${BACKENDS:-1000}
INTERVAL=${INTERVAL:-1s}
CHECK=${CHECK:-tcp}
SECONDS_MEASURED=${SECONDS:-30}
BIN=${TCPLB:-target/release/tcplb}
[ -x "$BIN" ] || cargo build --release --locked -q
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || true

python3 - "$BACKENDS" "$WORK" <<'PY' &
import asyncio, sys, time
n, work = int(sys.argv[1]), sys.argv[2]
stamps = []
async def handle(reader, writer):
    stamps.append(time.monotonic())
    try:
        data = await reader.read(1024)
        if data.startswith(b"PING"):
            writer.write(b"+PONG\r\n")
        elif data.startswith(b"GET"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    servers = [await asyncio.start_server(handle, "127.0.0.1", 0, backlog=64) for _ in range(n)]
    with open(f"{work}/ports", "w") as f:
        f.write("\n".join(str(s.sockets[0].getsockname()[1]) for s in servers))
    while True:
        await asyncio.sleep(0.5)
        with open(f"{work}/stamps", "w") as f:
            f.write("\n".join(f"{t:.6f}" for t in stamps))
asyncio.run(main())
PY
for _ in $(seq 100); do [ -s "$WORK/ports" ] && break; sleep 0.1; done
{
    echo '[[listener]]'
    echo 'name = "probed"'
    echo 'listen = "127.0.0.1:0"'
    echo 'upstreams = ['
    sed 's/.*/  "127.0.0.1:&",/' "$WORK/ports"
    echo ']'
    echo '[listener.health]'
    echo "check = \"$CHECK\""
    echo "interval = \"$INTERVAL\""
} > "$WORK/tcplb.toml"
"$BIN" --config "$WORK/tcplb.toml" --log-level warn 2>"$WORK/tcplb.err" &
LB=$!
interval_s=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)(ms|s)', sys.argv[1]); print(int(m[1])/(1000 if m[2]=='ms' else 1))" "$INTERVAL")
sleep "$(python3 -c "print(2 * $interval_s)")"
cpu() { awk '{print $14 + $15}' "/proc/$LB/stat"; }
t0=$(date +%s.%N); c0=$(cpu)
sleep "$SECONDS_MEASURED"
t1=$(date +%s.%N); c1=$(cpu)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$LB/status")
sleep 0.6 # one more dump of the arrival times
python3 - "$WORK/stamps" "$t0" "$t1" "$c0" "$c1" "$rss" "$BACKENDS" "$CHECK" "$INTERVAL" <<'PY'
import os, statistics, sys, time
path, t0, t1, c0, c1, rss, n, check, interval = sys.argv[1:]
t0, t1, c0, c1 = float(t0), float(t1), int(c0), int(c1)
hz = os.sysconf("SC_CLK_TCK")
stamps = [float(x) for x in open(path).read().split()]
# The last SECONDS of arrivals, in 100 ms windows.
end = max(stamps)
span = t1 - t0
recent = [t for t in stamps if t > end - span]
windows = [0] * int(span * 10)
for t in recent:
    i = int((t - (end - span)) * 10)
    if 0 <= i < len(windows):
        windows[i] += 1
cpu_s = (c1 - c0) / hz
probes = len(recent)
print(f"{n} backends, check {check}, every {interval}, {span:.0f} s measured")
print(f"probes: {probes} ({probes / span:.0f}/s)")
print(f"tcplb CPU: {100 * cpu_s / span:.1f}% of one core, {1e6 * cpu_s / max(probes, 1):.1f} µs per probe; RSS {int(rss) / 1024:.1f} MiB")
print(f"probes per 100 ms: median {statistics.median(windows):.0f}, max {max(windows)}, min {min(windows)}")
PY
kill $LB 2>/dev/null || true
