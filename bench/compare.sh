#!/usr/bin/env bash
# Side-by-side benchmark of tcplb, HAProxy (mode tcp, with and without
# splice) and nginx stream, plus a direct connection (the physical limit).
# tcplb runs twice: "tcplb" with every default, as users run it (protocol
# auto, access log on at info, written to a file), and "tcplb-tuned" as a
# benchmark would tune it (protocol tcp, access log off, log level warn).
# Loopback only; bounded in time (about 8 minutes with the defaults); stops
# everything it started, also on Ctrl-C. Prints a Markdown table.
#
#   bench/compare.sh                 # 3 rounds
#   ROUNDS=5 DURATION=5 bench/compare.sh
#   SKIP_MEMORY=1 bench/compare.sh   # skip the 10,000 idle connections test
#   TCPLB_B=/tmp/tcplb-old bench/compare.sh   # A/B: a second tcplb build, as "tcplb-b"
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
own_proxies compare.sh
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}        # seconds per wrk run
IPERF_TIME=${IPERF_TIME:-3}    # seconds per iperf3 run
CORES=$(nproc)

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v wrk >/dev/null || need+=(wrk)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
TCPLB=$ROOT/target/release/tcplb

WORK=$(mktemp -d /tmp/tcplb-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/nginx-be.pid" ] && kill "$(cat "$WORK/nginx-be.pid")" 2>/dev/null || true
    [ -f "$WORK/nginx-lb.pid" ] && kill "$(cat "$WORK/nginx-lb.pid")" 2>/dev/null || true
    [ -f "$WORK/nginx-tls.pid" ] && kill "$(cat "$WORK/nginx-tls.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
# Each proxied connection holds two descriptors in the proxy.
MAXCONN=$(( (FDS - 1200) / 2 ))
IDLE_CONNS=${IDLE_CONNS:-$(( MAXCONN < 10000 ? MAXCONN - 100 : 10000 ))}

# Ports: backends 18081/18082, iperf3 18201, Redis 18202, an HTTPS backend
# 18083 and a port where nothing listens 18099; proxies below.
B1=18081; B2=18082; IPERF=18201; REDIS=18202; BTLS=18083; DEAD=18099
declare -A HTTP_PORT=([direct]=$B1 [haproxy]=18101 [haproxy-splice]=18102 [nginx]=18103 [tcplb]=18104 [tcplb-b]=18105 [tcplb-tuned]=18106)
declare -A IPERF_PORT=([direct]=$IPERF [haproxy]=18111 [haproxy-splice]=18112 [nginx]=18113 [tcplb]=18114 [tcplb-b]=18115 [tcplb-tuned]=18116)
declare -A REDIS_PORT=([direct]=$REDIS [haproxy]=18131 [haproxy-splice]=18132 [nginx]=18133 [tcplb]=18134 [tcplb-b]=18135 [tcplb-tuned]=18136)
declare -A TLS_PORT=([direct]=$BTLS [haproxy]=18141 [haproxy-splice]=18142 [nginx]=18143 [tcplb]=18144 [tcplb-b]=18145 [tcplb-tuned]=18146)
declare -A IDLE_PORT=([haproxy]=18121 [nginx]=18123 [tcplb]=18124 [tcplb-b]=18125 [tcplb-tuned]=18126)
SINK=18301
PROXIES=(direct haproxy haproxy-splice nginx tcplb tcplb-tuned)
[ -n "${TCPLB_B:-}" ] && PROXIES+=(tcplb-b)

require_free_ports $B1 $B2 $IPERF $REDIS $BTLS $DEAD $SINK "${TLS_PORT[@]}" "${HTTP_PORT[@]}" "${IPERF_PORT[@]}" "${REDIS_PORT[@]}" "${IDLE_PORT[@]}"

# --- backends: two nginx HTTP servers with a short body, one iperf3 server.
start_http_backends "$WORK" $B1 $B2
iperf3 -s -p $IPERF -D --pidfile "$WORK/iperf.pid" >/dev/null
sleep 0.3; PIDS+=("$(cat "$WORK/iperf.pid")")
# Redis: long-lived connections with small messages, as in a connection pool.
redis-server --bind 127.0.0.1 --port $REDIS --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
for _ in $(seq 1 50); do [ -s "$WORK/redis.pid" ] && break; sleep 0.1; done
PIDS+=("$(cat "$WORK/redis.pid")")

# HTTPS: nginx with an ECDSA certificate for "localhost", the name wrk
# sends as SNI for https://localhost:PORT/ (it connects to 127.0.0.1 after
# ::1 refuses). Every proxy routes that name here by SNI, without
# terminating TLS, and any other name to DEAD: a request that was not
# routed fails, and wrk_parse counts the run as 0.
start_tls_backend "$WORK" $BTLS

# A sink that accepts and holds connections, for the memory test.
cat > "$WORK/sink.py" <<'PY'
import asyncio, sys
async def hold(r, w):
    await r.read()
    w.close()
async def main():
    s = await asyncio.start_server(hold, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
PY
setsid python3 "$WORK/sink.py" $SINK & PIDS+=($!)

# --- proxies
cat > "$WORK/haproxy.cfg" <<CONF
$(haproxy_head "$CORES" "maxconn $MAXCONN" "maxpipes 200")
frontend http
    bind 127.0.0.1:${HTTP_PORT[haproxy]}
    default_backend http
frontend http_splice
    bind 127.0.0.1:${HTTP_PORT[haproxy-splice]}
    option splice-request
    option splice-response
    default_backend http
backend http
    server b1 127.0.0.1:$B1
    server b2 127.0.0.1:$B2
frontend iperf
    bind 127.0.0.1:${IPERF_PORT[haproxy]}
    default_backend iperf
frontend iperf_splice
    bind 127.0.0.1:${IPERF_PORT[haproxy-splice]}
    option splice-request
    option splice-response
    default_backend iperf
backend iperf
    server i1 127.0.0.1:$IPERF
frontend redis
    bind 127.0.0.1:${REDIS_PORT[haproxy]}
    default_backend redis
frontend redis_splice
    bind 127.0.0.1:${REDIS_PORT[haproxy-splice]}
    option splice-request
    option splice-response
    default_backend redis
backend redis
    server r1 127.0.0.1:$REDIS
frontend tls
    bind 127.0.0.1:${TLS_PORT[haproxy]}
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend tls if { req.ssl_sni -i localhost }
    default_backend dead
frontend tls_splice
    bind 127.0.0.1:${TLS_PORT[haproxy-splice]}
    option splice-request
    option splice-response
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend tls if { req.ssl_sni -i localhost }
    default_backend dead
backend tls
    server t1 127.0.0.1:$BTLS
backend dead
    server d1 127.0.0.1:$DEAD
frontend idle
    bind 127.0.0.1:${IDLE_PORT[haproxy]}
    default_backend idle
backend idle
    server s1 127.0.0.1:$SINK
CONF
haproxy -c -q -f "$WORK/haproxy.cfg" || { echo "haproxy rejected its configuration" >&2; exit 1; }
# Every server runs in a session of its own (setsid), as under systemd or in
# a container: with the kernel's autogroup scheduling (on by default), all the
# processes of one session share one fair share of the CPU, so a proxy left in
# this script's session would share wrk's (nginx and iperf3 daemonize and get
# their own). Measured: tcplb in wrk's session ran conn-close at 0.91x nginx,
# in its own 1.00x (docs/benchmarks.md, "Sessions and autogroup").
setsid haproxy -f "$WORK/haproxy.cfg" -q 2>"$WORK/haproxy.err" & PIDS+=($!); HAPROXY_PID=$!

cat > "$WORK/nginx-lb.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $CORES;
worker_rlimit_nofile $FDS;
pid $WORK/nginx-lb.pid;
error_log $WORK/nginx-lb.err;
events { worker_connections $FDS; }
stream {
    upstream http { server 127.0.0.1:$B1; server 127.0.0.1:$B2; }
    upstream iperf { server 127.0.0.1:$IPERF; }
    upstream redis { server 127.0.0.1:$REDIS; }
    upstream idle { server 127.0.0.1:$SINK; }
    map \$ssl_preread_server_name \$tls_upstream {
        localhost 127.0.0.1:$BTLS;
        default 127.0.0.1:$DEAD;
    }
    server { listen 127.0.0.1:${TLS_PORT[nginx]} backlog=4096; ssl_preread on; proxy_pass \$tls_upstream; }
    server { listen 127.0.0.1:${HTTP_PORT[nginx]} backlog=4096; proxy_pass http; }
    server { listen 127.0.0.1:${IPERF_PORT[nginx]}; proxy_pass iperf; }
    server { listen 127.0.0.1:${REDIS_PORT[nginx]} backlog=4096; proxy_pass redis; }
    server { listen 127.0.0.1:${IDLE_PORT[nginx]} backlog=4096; proxy_pass idle; proxy_timeout 1h; }
}
CONF
nginx -c "$WORK/nginx-lb.conf"

tcplb_config() { # name [tuned] -> its configuration file, on its ports
    cat > "$WORK/$1.toml" <<CONF
max_connections = $MAXCONN
$([ "${2:-}" = tuned ] && tcplb_defaults)
[[listener]]
name = "http"
listen = "127.0.0.1:${HTTP_PORT[$1]}"
upstreams = ["127.0.0.1:$B1", "127.0.0.1:$B2"]
[[listener]]
name = "iperf"
listen = "127.0.0.1:${IPERF_PORT[$1]}"
upstreams = ["127.0.0.1:$IPERF"]
# iperf3's server takes one client at a time, and a probe's connection
# (held ~100 ms to catch a backend that closes at once) is one: a test that
# starts meanwhile is refused. The peers here do not probe either.
[listener.health]
check = "none"
[[listener]]
name = "redis"
listen = "127.0.0.1:${REDIS_PORT[$1]}"
upstreams = ["127.0.0.1:$REDIS"]
[[listener]]
name = "tls"
listen = "127.0.0.1:${TLS_PORT[$1]}"
upstreams = ["127.0.0.1:$DEAD"]
[[listener.route]]
name = "localhost"
sni = ["localhost"]
upstreams = ["127.0.0.1:$BTLS"]
[[listener]]
name = "idle"
listen = "127.0.0.1:${IDLE_PORT[$1]}"
upstreams = ["127.0.0.1:$SINK"]
CONF
    echo "$WORK/$1.toml"
}
# Defaults: no --log-level, and RUST_LOG unset, so info with an access-log
# event per connection, going to a file as it would to journald.
env -u RUST_LOG setsid "$TCPLB" --config "$(tcplb_config tcplb)" ${TCPLB_ARGS:-} 2>"$WORK/tcplb.log" & PIDS+=($!); TCPLB_PID=$!
setsid "$TCPLB" --config "$(tcplb_config tcplb-tuned tuned)" --log-level warn ${TCPLB_ARGS:-} & PIDS+=($!); TCPLB_TUNED_PID=$!
if [ -n "${TCPLB_B:-}" ]; then
    env -u RUST_LOG setsid "$TCPLB_B" --config "$(tcplb_config tcplb-b)" ${TCPLB_ARGS:-} 2>"$WORK/tcplb-b.log" & PIDS+=($!); TCPLB_B_PID=$!
fi
sleep 1

# --- workloads
# port streams direction pids... -> "Gbit/s proxy-CPU-ms-per-GB". Direction
# "up": the client sends and the server stays silent (iperf3's default: an
# upload, a bulk load, a backup stream); "down": the server sends (-R).
iperf_run() {
    local port=$1 streams=$2 dir=$3 c0=0 c1=0 out
    shift 3
    [ $# -gt 0 ] && c0=$(cpu_ticks "$@")
    out=$(iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_TIME" -P "$streams" $([ "$dir" = down ] && echo -R) -J 2>/dev/null || true)
    [ $# -gt 0 ] && c1=$(cpu_ticks "$@")
    printf '%s' "$out" | python3 -c '
import json, sys
d = {}
ticks, us = int(sys.argv[1]), int(sys.argv[2])
try:
    d = json.load(sys.stdin)
    s = d["end"]["sum_received"]
    gb = s["bytes"] / 1e9
    cpu = "%.1f" % (ticks * us / 1e3 / gb) if ticks else "nan"
    print("%.2f %s" % (s["bits_per_second"] / 1e9, cpu))
except (ValueError, KeyError, ZeroDivisionError):
    # A failed run (iperf3 puts its error in the JSON) counts as nothing.
    print("iperf3 failed: %s" % d.get("error", "no result"), file=sys.stderr)
    print("nan nan")' $((c1 - c0)) "$TICK_US"
}

# port pids... -> "SET-req/s GET-req/s proxy-CPU": redis-benchmark, 50
# clients, REDIS_N requests of each with 1 KiB values (each client moves about
# 2 MB each way per test: long-lived connections with small messages, past
# the 1 MiB where an earlier tcplb started to splice every message); CPU in
# µs per request over both tests (nan without PIDs: the direct path).
REDIS_N=${REDIS_N:-100000}
redis_run() {
    local port=$1 c0=0 c1=0 out set get
    shift
    [ $# -gt 0 ] && c0=$(cpu_ticks "$@")
    out=$(redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n "$REDIS_N" -t set,get -d 1024 --csv 2>&1 || true)
    [ $# -gt 0 ] && c1=$(cpu_ticks "$@")
    read -r set get < <(awk -F'"' '$2 == "SET" { s = $4 } $2 == "GET" { g = $4 } END { print s, g }' <<<"$out")
    if [ -z "$get" ]; then
        printf 'redis-benchmark failed:\n%s\n' "$out" >&2
        echo "nan nan nan"
        return
    fi
    awk -v r="$set $get" -v t=$((c1 - c0)) -v n=$((2 * REDIS_N)) -v us="$TICK_US" -v has=$# \
        'BEGIN { printf "%s %s\n", r, (has > 0) ? sprintf("%.1f", t * us / n) : "nan" }'
}

nginx_pids() { pgrep -P "$(cat "$WORK/nginx-lb.pid")" | tr '\n' ' '; cat "$WORK/nginx-lb.pid"; }
proxy_pids() { # proxy -> its processes (none for direct)
    case $1 in
        haproxy | haproxy-splice) echo "$HAPROXY_PID" ;;
        nginx) nginx_pids ;;
        tcplb) echo "$TCPLB_PID" ;;
        tcplb-tuned) echo "$TCPLB_TUNED_PID" ;;
        tcplb-b) echo "$TCPLB_B_PID" ;;
    esac
}
# proxy port extra-header [path] -> "rps p50_ms p99_ms proxy-CPU machine-CPU"
# (bench/lib.sh: wrk_measured; no proxy CPU for the direct path).
wrk_cpu() {
    wrk_measured "http://127.0.0.1:$2${4:-/}" "$3" "${DURATION}s" $(proxy_pids "$1")
}

RESULTS=$WORK/results.txt
: > "$RESULTS"
# Odd rounds run the proxies in order, even rounds in reverse (A B C, C B A,
# ...; ABBA generalized), so that no proxy always runs after the same one:
# the position is worth up to 10% here (an A/A run read 1.04-1.05x in fixed
# order; bench/ab.sh's pairs show the same effect, cancelled the same way).
# Within a round each workload runs on every proxy in turn before the next
# workload starts, so the figures a ratio compares were taken seconds apart,
# not a minute (this machine's speed drifts in phases of that length).
declare -A KA P50 P99 CPU_KA MACH_KA CL CPU_CL MACH_CL I1 I8 KA64 CPU_KA64 RSET RGET CPU_REDIS
declare -A CPU_I1 CPU_I8 D1 CPU_D1 D8 CPU_D8 TLS CPU_TLS
for round in $(seq 1 "$ROUNDS"); do
    round_order "$round" "${PROXIES[@]}"
    for p in "${ORDER[@]}"; do
        read -r KA[$p] P50[$p] P99[$p] CPU_KA[$p] MACH_KA[$p] < <(wrk_cpu "$p" "${HTTP_PORT[$p]}" "")
    done
    for p in "${ORDER[@]}"; do
        read -r CL[$p] _ _ CPU_CL[$p] MACH_CL[$p] < <(wrk_cpu "$p" "${HTTP_PORT[$p]}" "Connection: close")
    done
    for p in "${ORDER[@]}"; do
        read -r I1[$p] CPU_I1[$p] < <(iperf_run "${IPERF_PORT[$p]}" 1 up $(proxy_pids "$p"))
    done
    for p in "${ORDER[@]}"; do
        read -r I8[$p] CPU_I8[$p] < <(iperf_run "${IPERF_PORT[$p]}" 8 up $(proxy_pids "$p"))
    done
    for p in "${ORDER[@]}"; do
        read -r D1[$p] CPU_D1[$p] < <(iperf_run "${IPERF_PORT[$p]}" 1 down $(proxy_pids "$p"))
    done
    for p in "${ORDER[@]}"; do
        read -r D8[$p] CPU_D8[$p] < <(iperf_run "${IPERF_PORT[$p]}" 8 down $(proxy_pids "$p"))
    done
    # Responses of 64 KiB (the others are 19 bytes): what a web page or
    # a larger API answer costs, where the size of the proxy's buffers
    # shows (HAProxy's and nginx's are 16 KiB by default, tcplb's 64 KiB).
    for p in "${ORDER[@]}"; do
        read -r KA64[$p] _ _ CPU_KA64[$p] _ < <(wrk_cpu "$p" "${HTTP_PORT[$p]}" "" /body/64k)
    done
    for p in "${ORDER[@]}"; do
        read -r RSET[$p] RGET[$p] CPU_REDIS[$p] < <(redis_run "${REDIS_PORT[$p]}" $(proxy_pids "$p"))
    done
    # New TLS connections routed by SNI: a handshake and one request each.
    for p in "${ORDER[@]}"; do
        read -r TLS[$p] _ _ CPU_TLS[$p] _ < <(wrk_measured "https://localhost:${TLS_PORT[$p]}/" "Connection: close" "${DURATION}s" $(proxy_pids "$p"))
    done
    for p in "${ORDER[@]}"; do
        echo "$round $p ${KA[$p]} ${CL[$p]} ${I1[$p]} ${I8[$p]} ${P50[$p]} ${P99[$p]} ${CPU_KA[$p]} ${CPU_CL[$p]} ${MACH_KA[$p]} ${MACH_CL[$p]} ${KA64[$p]} ${CPU_KA64[$p]} ${RSET[$p]} ${RGET[$p]} ${CPU_REDIS[$p]} ${CPU_I1[$p]} ${CPU_I8[$p]} ${D1[$p]} ${CPU_D1[$p]} ${D8[$p]} ${CPU_D8[$p]} ${TLS[$p]} ${CPU_TLS[$p]}" | tee -a "$RESULTS" >&2
    done
done

# --- memory: RSS (PSS for multi-process nginx) with IDLE_CONNS idle proxied connections.
pss_kib() { # pids... -> summed Pss (KiB)
    local t=0
    for pid in "$@"; do
        v=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo $t
}
MEM=$WORK/memory.txt
: > "$MEM"
if [ -z "${SKIP_MEMORY:-}" ]; then
    cat > "$WORK/idle.py" <<'PY'
import socket, sys, time
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
print("open", flush=True)
time.sleep(hold)
PY
    for p in "${PROXIES[@]}"; do
        [ "$p" = direct ] || [ "$p" = haproxy-splice ] && continue
        pids=$(proxy_pids $p)
        before=$(pss_kib $pids)
        python3 "$WORK/idle.py" "${IDLE_PORT[$p]}" "$IDLE_CONNS" 8 > "$WORK/idle.out" & idle=$!
        for _ in $(seq 1 100); do grep -q open "$WORK/idle.out" 2>/dev/null && break; sleep 0.2; done
        sleep 3
        after=$(pss_kib $pids)
        wait $idle || true
        echo "$p $before $after" | tee -a "$MEM" >&2
        sleep 2
    done
fi

# --- report
python3 - "$RESULTS" "$MEM" "$IDLE_CONNS" <<'PY'
import math, sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
proxies = ["direct", "haproxy", "haproxy-splice", "nginx", "tcplb", "tcplb-tuned"]
ab = "tcplb-b" in {r[1] for r in rows}  # a second build (TCPLB_B), for A/B
if ab:
    proxies.append("tcplb-b")
metrics = [("keep-alive req/s", 2), ("conn-close req/s", 3),
           ("iperf3 upload 1 stream Gbit/s", 4), ("proxy CPU ms/GB (upload 1 stream)", 17),
           ("iperf3 upload 8 streams Gbit/s", 5), ("proxy CPU ms/GB (upload 8 streams)", 18),
           ("iperf3 download 1 stream Gbit/s", 19), ("proxy CPU ms/GB (download 1 stream)", 20),
           ("iperf3 download 8 streams Gbit/s", 21), ("proxy CPU ms/GB (download 8 streams)", 22),
           ("p50 ms (keep-alive)", 6), ("p99 ms (keep-alive)", 7),
           ("proxy CPU µs/req (keep-alive)", 8), ("proxy CPU µs/req (conn-close)", 9),
           ("machine CPU µs/req (keep-alive)", 10), ("machine CPU µs/req (conn-close)", 11),
           ("keep-alive req/s, 64 KiB responses", 12), ("proxy CPU µs/req (keep-alive, 64 KiB)", 13),
           ("Redis SET req/s (1 KiB values)", 14), ("Redis GET req/s (1 KiB values)", 15),
           ("proxy CPU µs/req (Redis)", 16),
           ("new TLS connections/s, routed by SNI", 23), ("proxy CPU µs/connection (TLS by SNI)", 24)]
def lower_better(name):  # latency and CPU
    return name.startswith("p50") or name.startswith("p99") or "CPU" in name
rounds = sorted({r[0] for r in rows})
def val(rnd, p, i):
    for r in rows:
        if r[0] == rnd and r[1] == p:
            return float(r[i])
    return math.nan  # that run is missing
def median(vs):  # of the rounds that measured something (a failed run is nan)
    vs = [v for v in vs if not math.isnan(v)]
    return statistics.median(vs) if vs else math.nan
med = {(p, i): median(val(r, p, i) for r in rounds) for p in proxies for _, i in metrics}
# Ratios per round, then the median ratio (absolute numbers drift on a shared machine).
def ratios(p, q_list, i, lower_better=False):  # one per round
    rs = []
    for r in rounds:
        a = val(r, p, i)
        qs = [v for v in (val(r, q, i) for q in q_list) if not math.isnan(v)]
        b = (min(qs) if lower_better else max(qs)) if qs else math.nan
        if math.isnan(a) or math.isnan(b):
            continue  # not measured (the direct path has no proxy CPU, or a run failed)
        rs.append((b / a if lower_better else a / b) if a and b else 0.0)
    return rs
def ratio(p, q_list, i, lower_better=False):
    rs = ratios(p, q_list, i, lower_better)
    return statistics.median(rs) if rs else None
def cell(v):
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"
peers = ["haproxy", "haproxy-splice", "nginx"]
print(f"Medians of {len(rounds)} rounds (proxies interleaved in each round).\n")
print("tcplb runs with its defaults; tcplb-tuned with protocol tcp, no access log, log level warn.\n")
print("| metric | " + " | ".join(proxies) + " | tcplb / direct | tcplb / best peer | defaults / tuned |")
print("|---|" + "---|" * (len(proxies) + 3))
for name, i in metrics:
    lower = lower_better(name)
    cells = [cell(med[(p, i)]) for p in proxies]
    d = ratio("tcplb", ["direct"], i, lower)
    b = ratio("tcplb", peers, i, lower)
    t = ratio("tcplb", ["tcplb-tuned"], i, lower)
    x = lambda r: "-" if r is None else f"{r:.2f}x"
    print(f"| {name} | " + " | ".join(cells) + f" | {x(d)} | {x(b)} | {x(t)} |")
# The best of three noisy peers is biased upwards (a maximum of samples), so
# also compare with each peer on its own: an equal proxy scores 1.0 here.
others = peers + ["tcplb-tuned"] + (["tcplb-b"] if ab else [])
# The spread of the per-round ratios shows how far one run can be trusted:
# a median of 0.95x whose rounds range from 0.85 to 1.10 is not a loss.
print("\ntcplb / each peer: median of per-round ratios (lowest-highest round):\n")
print("| metric | " + " | ".join(others) + " |")
print("|---|" + "---|" * len(others))
def spread(rs):
    if not rs:
        return "-"
    return f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"
for name, i in metrics:
    lower = lower_better(name)
    print(f"| {name} | " + " | ".join(spread(ratios("tcplb", [q], i, lower)) for q in others) + " |")
mem = [l.split() for l in open(sys.argv[2]) if l.strip()]
if mem:
    n = int(sys.argv[3])
    print(f"\nMemory with {n} idle proxied connections (PSS, KiB):\n")
    print("| proxy | before | after | KiB per connection |")
    print("|---|---|---|---|")
    for p, before, after in mem:
        print(f"| {p} | {before} | {after} | {(int(after) - int(before)) / n:.2f} |")
print("\nRatios are medians of per-round ratios; for latency and CPU, > 1 means tcplb is faster or cheaper.")
PY
