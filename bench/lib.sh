# Shared by the bench scripts (sourced, not run).

# PIN=1: the proxies run on the last core and everything else the scripts
# start (wrk, the backends) on the others, so no proxy shares a core with
# the client or the backends. On a small machine the client is then the
# limit and every proxy carries about the same rate: what separates them is
# their own CPU a connection, measured without the others' wake-ups and
# cache misses on its core. WORKERS defaults to 1 then.
if [ "${PIN:-0}" = 1 ]; then
    WORKERS=${WORKERS:-1}
    PIN_LB=$(($(nproc) - 1))
    [ "$PIN_LB" -ge 1 ] || { echo "PIN=1 needs at least 2 cores" >&2; exit 2; }
    command -v taskset >/dev/null || { echo "PIN=1 needs taskset (Debian: util-linux)" >&2; exit 2; }
    taskset -p -c "0-$((PIN_LB - 1))" $$ >/dev/null
fi

# CAP=F (a fraction of one core, 0.25 say): each proxy runs in a cgroup of
# its own that may use F of a core, a CFS quota over a 10 ms period. The
# proxy is then the limit, as it is on a machine with cores to spare for
# the client and the backends, and its rate is F over its CPU a connection.
# Check that the proxies' CPU reads F and wrk stays below a full core.
# Needs cgroup v2's cpu.max or v1's cpu controller, writable (root).
CAP_ROOT=""
if [ -n "${CAP:-}" ]; then
    [[ $CAP =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v f="$CAP" 'BEGIN { exit !(f >= 0.1 && f <= 64) }' ||
        { echo "CAP=$CAP: want the cores each proxy may use, 0.1 to 64, such as 0.25" >&2; exit 2; }
    if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
        CAP_ROOT=/sys/fs/cgroup
        # v2 gives a child the cpu controller only when its parent hands it on.
        grep -qw cpu $CAP_ROOT/cgroup.subtree_control 2>/dev/null ||
            echo +cpu > $CAP_ROOT/cgroup.subtree_control 2>/dev/null || true
    elif [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        CAP_ROOT=/sys/fs/cgroup/cpu
    fi
    [ -n "$CAP_ROOT" ] && [ -w "$CAP_ROOT" ] ||
        { echo "CAP=$CAP needs a writable cgroup cpu controller (run as root)" >&2; exit 2; }
fi

# For a script that starts its proxies itself, not with start_lb: PIN and
# CAP would pin or cap nothing there, so they are refused.
own_proxies() { # SCRIPT
    [ "${PIN:-0}" != 1 ] && [ -z "${CAP:-}" ] ||
        { echo "$1: PIN and CAP apply to proxies started by start_lb; this script starts its own (use ab.sh)" >&2; exit 2; }
}

# Moves the processes PID... (and their threads, and children they start
# later) into a new cgroup NAME limited to CAP of a core (at least 0.1:
# the kernel takes no quota below 1 ms a period).
cap_cpu() { # NAME PID...
    local dir="$CAP_ROOT/$1" period=10000 quota pid
    shift
    quota=$(awk -v f="$CAP" -v p=$period 'BEGIN { printf "%d", f * p }')
    mkdir -p "$dir"
    if [ -f "$dir/cpu.max" ]; then
        echo "$quota $period" > "$dir/cpu.max"
    else
        echo $period > "$dir/cpu.cfs_period_us"
        echo "$quota" > "$dir/cpu.cfs_quota_us"
    fi
    for pid in "$@"; do echo "$pid" > "$dir/cgroup.procs"; done
}

# Removes the cgroup NAME once nothing is left in it.
uncap_cpu() { # NAME
    local dir="$CAP_ROOT/$1"
    [ -n "$CAP_ROOT" ] && [ -d "$dir" ] || return 0
    for _ in $(seq 1 50); do rmdir "$dir" 2>/dev/null && return 0; sleep 0.1; done
    echo "cgroup $dir still has processes" >&2
}

# Exits 1, naming them, when any of the given 127.0.0.1 ports has a
# listener: a leftover server would be measured in place of the real one.
# SO_REUSEADDR as the servers use it, so TIME_WAIT does not count as busy.
require_free_ports() {
    local busy
    busy=$(python3 - "$@" <<'PY'
import socket, sys
for port in sorted(set(map(int, sys.argv[1:]))):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        print(port, end=" ")
    finally:
        s.close()
PY
)
    if [ -n "$busy" ]; then
        echo "$(basename "$0"): port(s) already in use on 127.0.0.1: $busy(stop what listens there)" >&2
        exit 1
    fi
}

# Starts one nginx serving a short body on two ports (the HTTP backends), and
# larger ones under /body/ (BODY_SIZES, in KiB: /body/64k is 65 536 bytes);
# its pid goes to DIR/nginx-be.pid.
BODY_SIZES="1 16 64 256 1024"
# The first lines of a one-worker nginx configuration whose pid and error
# log are DIR/NAME.pid and DIR/NAME.err.
nginx_head() { # DIR NAME
    cat <<CONF
worker_processes 1;
pid $1/$2.pid;
error_log $1/$2.err;
events { worker_connections 4096; }
CONF
}
start_http_backends() { # DIR PORT1 PORT2
    mkdir -p "$1/www"
    chmod 755 "$1" "$1/www" # nginx's workers run as another user
    for kib in $BODY_SIZES; do
        head -c $((kib * 1024)) /dev/zero | tr '\0' x > "$1/www/${kib}k"
    done
    { nginx_head "$1" nginx-be; cat <<CONF; } > "$1/nginx-be.conf"
http {
    access_log off;
    keepalive_requests 1000000;
    sendfile on;
    server { listen 127.0.0.1:$2 backlog=4096; location / { return 200 "hello from backend\n"; } location /body/ { alias $1/www/; } }
    server { listen 127.0.0.1:$3 backlog=4096; location / { return 200 "hello from backend\n"; } location /body/ { alias $1/www/; } }
}
CONF
    nginx -c "$1/nginx-be.conf"
}

# Starts one nginx that terminates TLS on PORT with an ECDSA certificate
# for "localhost" (the name wrk sends as SNI for https://localhost:PORT/),
# made for the run; its pid goes to DIR/nginx-tls.pid.
start_tls_backend() { # DIR PORT
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=localhost -keyout "$1/tls.key" -out "$1/tls.pem" 2>/dev/null
    { nginx_head "$1" nginx-tls; cat <<CONF; } > "$1/nginx-tls.conf"
http {
    access_log off;
    server {
        listen 127.0.0.1:$2 ssl backlog=4096;
        ssl_certificate $1/tls.pem;
        ssl_certificate_key $1/tls.key;
        location / { return 200 "hello, tls\n"; }
    }
}
CONF
    nginx -c "$1/nginx-tls.conf"
}

# The [defaults] every benchmarked tcplb runs with: plain TCP (no HTTP
# first-exchange watch) and no access log, as the peers are configured.
tcplb_defaults() {
    printf '[defaults]\nprotocol = "tcp"\naccess_log = false\n'
}

# For the scripts that measure tcplb's defaults against its tuning
# (bulk_defaults.sh, redis_defaults.sh): a fresh WORK directory, an empty
# PIDS (start_defaults_and_tuned adds to it) and, on exit, every pid in
# PIDS and the server whose pid file is WORK/PIDFILE stopped, WORK removed.
defaults_work() { # NAME PIDFILE
    WORK=$(mktemp -d "/tmp/tcplb-$1.XXXXXX")
    SERVER_PID_FILE=$WORK/$2
    PIDS=()
    trap defaults_cleanup EXIT
}
defaults_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$SERVER_PID_FILE" ] && kill "$(cat "$SERVER_PID_FILE")" 2>/dev/null || true
    rm -rf "$WORK"
}

# Runs ROUNDS rounds of the commands SIDE_A and SIDE_B (functions that print
# one side's figures on a line), the order alternating (A B, B A, ...)
# because whichever runs second in a pair is favoured; prints and appends
# "ROUND A-FIGURES B-FIGURES" to FILE (ab.sh, who_pays.sh and the
# defaults-against-tuned scripts).
alternate_rounds() { # ROUNDS FILE SIDE_A SIDE_B
    local i a b
    : > "$2"
    for i in $(seq 1 "$1"); do
        if [ $((i % 2)) = 1 ]; then a=$("$3"); b=$("$4"); else b=$("$4"); a=$("$3"); fi
        echo "$i $a $b" | tee -a "$2"
    done
}

# For the scripts that measure tcplb's defaults against its tuning
# (bulk_defaults.sh, redis_defaults.sh): starts BIN twice in front of
# 127.0.0.1:SERVER, with its defaults on DEFAULTS and tuned (tcplb_defaults,
# log level warn) on TUNED, each in a session of its own as compare.sh
# starts every proxy. LINES: more lines for the listener. Sets PID_D and
# PID_T and adds both to PIDS (for the caller's cleanup).
start_defaults_and_tuned() { # WORK BIN SERVER DEFAULTS TUNED NAME [LINES]
    local work=$1 bin=$2 server=$3 defaults=$4 tuned=$5 name=$6 lines=${7:-}
    printf '[[listener]]\nname = "%s"\nlisten = "127.0.0.1:%s"\nupstreams = ["127.0.0.1:%s"]\n%s' \
        "$name" "$defaults" "$server" "$lines" > "$work/defaults.toml"
    { tcplb_defaults; sed "s/$defaults/$tuned/" "$work/defaults.toml"; } > "$work/tuned.toml"
    setsid "$bin" --config "$work/defaults.toml" 2>"$work/defaults.log" & PIDS+=($!); PID_D=$!
    setsid "$bin" --config "$work/tuned.toml" --log-level warn 2>/dev/null & PIDS+=($!); PID_T=$!
    sleep 1
}

# bench/floor's relay (built on first use by require_lb): the least a tokio
# proxy does per connection, no routing, no log (docs/benchmarks.md).
FLOOR_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/floor
FLOOR=$FLOOR_DIR/target/release/floor

# Exits 2 unless WHO is an installed nginx or haproxy, bench/floor's relay
# ("floor"), or an executable (a tcplb build).
require_lb() { # WHO
    case $1 in
        nginx | haproxy | haproxy-splice)
            command -v "${1%-splice}" >/dev/null || { echo "$(basename "$0"): needs ${1%-splice} (bench/compare.sh installs it)" >&2; exit 2; } ;;
        floor)
            [ -x "$FLOOR" ] || (cd "$FLOOR_DIR" && cargo build --release -q) \
                || { echo "$(basename "$0"): cannot build bench/floor" >&2; exit 2; } ;;
        *) [ -x "$1" ] || { echo "$(basename "$0"): not an executable (nor nginx, haproxy or haproxy-splice): $1" >&2; exit 2; } ;;
    esac
}

# For the scripts that measure one load balancer at a time (ab.sh,
# wakeups.sh): checks the ports, makes WORK (a temporary directory), starts
# the two nginx backends on B1 and B2 (the balancer goes on LB), and stops
# everything on exit, also on Ctrl-C.
one_lb_setup() { # NAME
    B1=18481; B2=18482; LB=18484
    require_free_ports $B1 $B2 $LB
    WORK=$(mktemp -d "/tmp/tcplb-$1.XXXXXX")
    trap one_lb_cleanup EXIT
    trap 'exit 130' INT TERM
    start_http_backends "$WORK" $B1 $B2
}
one_lb_cleanup() {
    stop_lb "$WORK"
    [ -f "$WORK/nginx-tls.pid" ] && kill "$(cat "$WORK/nginx-tls.pid")" 2>/dev/null || true
    [ -f "$WORK/nginx-be.pid" ] && kill "$(cat "$WORK/nginx-be.pid")" 2>/dev/null || true
    sleep 0.3
    rm -rf "$WORK"
}

# After one_lb_setup, for WORKLOAD=tls: the nginx TLS backend on
# TLS_BACKEND and a TLS_DEAD port where nothing may listen (a name that was
# not routed fails), exported for start_lb; one_lb_cleanup stops it.
tls_workload_setup() {
    TLS_BACKEND=18483; TLS_DEAD=18480
    require_free_ports $TLS_BACKEND $TLS_DEAD
    export TLS_BACKEND TLS_DEAD
    start_tls_backend "$WORK" $TLS_BACKEND
}

# The global and defaults sections of every benchmarked HAProxy: mode tcp,
# round robin, 16 KiB buffers; extra global lines as arguments.
haproxy_head() { # THREADS [GLOBAL-LINE...]
    printf 'global\n    nbthread %s\n    tune.bufsize 16384\n' "$1"
    shift
    for line in "$@"; do printf '    %s\n' "$line"; done
    printf 'defaults\n    mode tcp\n    balance roundrobin\n    timeout connect 3s\n    timeout client 1h\n    timeout server 1h\n'
}

# A side given as `shipped:BINARY` or `tuned:BINARY` (ab.sh, who_pays.sh):
# tcplb with its own defaults or with tcplb_defaults' tuning, whatever
# TCPLB_AS_SHIPPED says for the other side. The binary, without the prefix:
bin_of() { # WHO
    case $1 in shipped:* | tuned:*) echo "${1#*:}" ;; *) echo "$1" ;; esac
}
# TCPLB_AS_SHIPPED for a side: its prefix's, or the one given for both.
shipped_of() { # WHO
    case $1 in shipped:*) echo 1 ;; tuned:*) echo 0 ;; *) echo "${TCPLB_AS_SHIPPED:-0}" ;; esac
}
# start_lb for such a side, with its own TCPLB_AS_SHIPPED, WORKERS workers
# and the backends B1 and B2.
start_side() { # DIR WHO PORT
    TCPLB_AS_SHIPPED=$(shipped_of "$2") start_lb "$1" "$(bin_of "$2")" "$WORKERS" "$3" $B1 $B2
}

# Starts one HTTP load balancer under test on 127.0.0.1:PORT, round robin
# over the backends B1 and B2: WHO is "nginx" (nginx stream with WORKERS
# processes sharing one socket, or each with its own SO_REUSEPORT socket when
# NGINX_REUSEPORT=1; NGINX_HALF_CLOSE=1 sets proxy_half_close on, so that
# it keeps the client's direction open after the backend's FIN as tcplb and
# HAProxy do, instead of closing both sockets at the first FIN; PEER_LOG=1
# gives it an access log, see below), "haproxy"
# (mode tcp, WORKERS threads, 16 KiB buffers),
# "haproxy-splice" (the same with splice both ways) or a tcplb binary
# (--threads WORKERS; TCPLB_EXTRA: more [defaults] lines, e.g. 'splice = "off"';
# TCPLB_AS_SHIPPED=1: its own defaults instead of tcplb_defaults' tuning).
# With TLS_BACKEND=PORT (and TLS_DEAD=PORT, where nothing listens) it routes
# TLS by SNI instead, without terminating it: "localhost" to TLS_BACKEND,
# any other name to TLS_DEAD (nginx ssl_preread and a map, HAProxy
# req.ssl_sni, a tcplb route), as compare.sh's TLS workload does.
# PEER_LOG=1 gives the peers an access line a connection, as tcplb's
# defaults have: nginx to a file, batched (buffer=64k flush=1s, as tcplb's
# writer batches), HAProxy `option tcplog` to stdout (a file), the way it
# runs in a container. Sets LB_PID (what
# stop_lb stops) and LB_PIDS (every process to measure).
start_lb() { # DIR WHO WORKERS PORT B1 B2
    local dir=$1 who=$2 workers=$3 port=$4 b1=$5 b2=$6 reuseport="" tls=${TLS_BACKEND:-} dead=${TLS_DEAD:-}
    if [ "$who" = nginx ]; then
        [ "${NGINX_REUSEPORT:-0}" = 1 ] && reuseport=" reuseport"
        local server="server { listen 127.0.0.1:$port backlog=4096$reuseport; proxy_pass http; }"
        [ -n "$tls" ] && server="map \$ssl_preread_server_name \$tls_upstream { localhost 127.0.0.1:$tls; default 127.0.0.1:$dead; }
    server { listen 127.0.0.1:$port backlog=4096$reuseport; ssl_preread on; proxy_pass \$tls_upstream; }"
        cat > "$dir/nginx-lb.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $workers;
pid $dir/nginx-lb.pid;
error_log $dir/nginx-lb.err;
events { worker_connections 4096; }
stream {
    upstream http { server 127.0.0.1:$b1; server 127.0.0.1:$b2; }
    $(if [ "${NGINX_HALF_CLOSE:-0}" = 1 ]; then echo "proxy_half_close on;"; fi)
    $(if [ "${PEER_LOG:-0}" = 1 ]; then printf 'log_format lb "$time_iso8601 $server_port $ssl_preread_server_name $ssl_preread_alpn_protocols $remote_addr:$remote_port $upstream_addr $bytes_received $bytes_sent $session_time $status";\n    access_log %s/nginx-access.log lb buffer=64k flush=1s;' "$dir"; fi)
    $server
}
CONF
        nginx -c "$dir/nginx-lb.conf"
        sleep 0.5
        LB_PID=$(cat "$dir/nginx-lb.pid")
    elif [ "$who" = haproxy ] || [ "$who" = haproxy-splice ]; then
        cat > "$dir/haproxy.cfg" <<CONF
$(haproxy_head "$workers")
frontend http
    bind 127.0.0.1:$port
$([ "$who" = haproxy-splice ] && printf '    option splice-request\n    option splice-response\n')
$([ "${PEER_LOG:-0}" = 1 ] && printf '    log stdout format raw local0\n    option tcplog\n')
$([ -n "$tls" ] && printf '    tcp-request inspect-delay 5s\n    tcp-request content accept if { req.ssl_hello_type 1 }\n    use_backend tls if { req.ssl_sni -i localhost }\n')
    default_backend http
backend http
    server b1 127.0.0.1:${dead:-$b1}
$([ -z "$tls" ] && printf '    server b2 127.0.0.1:%s\n' "$b2")
backend tls
    server t1 127.0.0.1:${tls:-$b1}
CONF
        # -q would silence the log to stdout too.
        setsid haproxy -f "$dir/haproxy.cfg" $([ "${PEER_LOG:-0}" = 1 ] || echo -q) >>"$dir/haproxy-access.log" & LB_PID=$!
        sleep 0.5
    elif [ "$who" = floor ]; then
        # It cannot route: with TLS it connects every client to TLS_BACKEND.
        setsid "$FLOOR" "127.0.0.1:$port" "$([ -n "$tls" ] && echo "127.0.0.1:$tls" || echo "127.0.0.1:$b1,127.0.0.1:$b2")" "$workers" & LB_PID=$!
        sleep 0.5
    else
        cat > "$dir/lb.toml" <<CONF
$(if [ "${TCPLB_AS_SHIPPED:-0}" != 1 ]; then tcplb_defaults; elif [ -n "${TCPLB_EXTRA:-}" ]; then echo "[defaults]"; fi)
${TCPLB_EXTRA:-}
[[listener]]
name = "http"
listen = "127.0.0.1:$port"
$(if [ -n "$tls" ]; then
    printf 'upstreams = ["127.0.0.1:%s"]\n[[listener.route]]\nname = "localhost"\nsni = ["localhost"]\nupstreams = ["127.0.0.1:%s"]\n' "$dead" "$tls"
else
    printf 'upstreams = ["127.0.0.1:%s", "127.0.0.1:%s"]\n' "$b1" "$b2"
fi)
CONF
        # A session of its own, as nginx (which daemonizes) has: see compare.sh.
        if [ "${TCPLB_AS_SHIPPED:-0}" = 1 ]; then
            # Its defaults: protocol auto, the access log on (to a file).
            setsid "$who" --config "$dir/lb.toml" --threads "$workers" 2>>"$dir/tcplb.log" & LB_PID=$!
        else
            setsid "$who" --config "$dir/lb.toml" --threads "$workers" --log-level warn & LB_PID=$!
        fi
        sleep 0.5
    fi
    echo "$LB_PID" > "$dir/lb.pid" # for stop_lb from another (sub)shell, e.g. a trap
    # nginx's workers, a wrapper's children (pgrep fails when there are none)
    LB_PIDS="$LB_PID $( (pgrep -P "$LB_PID" || true) | tr '\n' ' ')"
    if [ "${PIN:-0}" = 1 ]; then
        # Every thread there is now; threads started later inherit it.
        local pid
        for pid in $LB_PIDS; do taskset -a -p -c "$PIN_LB" "$pid" >/dev/null; done
    fi
    # Named after the pid in lb.pid, from which stop_lb finds it again.
    [ -n "${CAP:-}" ] && cap_cpu "tcplb-bench-$LB_PID" $LB_PIDS
    return 0
}

# Stops what start_lb started in DIR; returns once it is gone (and its port free).
stop_lb() { # DIR
    [ -f "$1/lb.pid" ] || return 0
    local pid
    pid=$(cat "$1/lb.pid")
    rm -f "$1/lb.pid"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true # returns at once for nginx, not our child
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    uncap_cpu "tcplb-bench-$pid"
}

cpu_ticks() { # pids... -> user + system clock ticks, all threads
    local t=0 u s
    for pid in "$@"; do
        # Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        read -r u s < <(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12, $13}')
        t=$((t + u + s))
    done
    echo $t
}
# Clock ticks the whole machine spent busy: user, nice, system, irq and
# softirq of all CPUs (not idle, iowait, or steal: time another guest had).
machine_busy_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# One measured wrk run (50 connections for DURATION, with the HEADER line
# unless it is empty) while the processes PID... carry it. Prints "req/s
# p50_ms p99_ms proxy-CPU machine-CPU", CPU in µs per request: the proxy's
# own (nan without PIDs: a direct connection) and the whole machine's busy
# time (client, backends and proxy: what a proxy costs everything sharing the
# cores). A run that failed requests prints "0 nan nan nan nan" (wrk_parse).
wrk_measured() { # URL HEADER DURATION [PID...]
    local url=$1 header=$2 duration=$3 c0=0 c1=0 m0 m1 r p50 p99 n
    shift 3
    [ $# -gt 0 ] && c0=$(cpu_ticks "$@")
    m0=$(machine_busy_ticks)
    read -r r p50 p99 n < <(wrk -t1 -c50 -d"$duration" --latency ${header:+-H "$header"} "$url" | wrk_parse)
    m1=$(machine_busy_ticks)
    [ $# -gt 0 ] && c1=$(cpu_ticks "$@")
    awk -v r="$r $p50 $p99" -v n="$n" -v t=$((c1 - c0)) -v m=$((m1 - m0)) -v us="$TICK_US" -v has=$# '
        BEGIN { printf "%s %s %s\n", r, (has > 0 && n > 0) ? sprintf("%.1f", t * us / n) : "nan",
                (n > 0) ? sprintf("%.1f", m * us / n) : "nan" }'
}

# One measured wrk run through one load balancer, started and stopped around
# it (ab.sh, sizes.sh): a 1 s warm-up, then wrk_measured. Prints "req/s
# proxy-CPU machine-CPU p99" (see wrk_measured); a run that failed requests
# prints "0 nan nan nan".
lb_run() { # WORK WHO WORKERS HEADER PATH DURATION
    local url="${URL_BASE:-http://127.0.0.1:}$LB$5" r p99 cpu mach
    start_lb "$1" "$2" "$3" $LB $B1 $B2
    wrk -t1 -c50 -d1 -H "$4" "$url" >/dev/null # warm-up
    read -r r _ p99 cpu mach < <(wrk_measured "$url" "$4" "$6" $LB_PIDS)
    stop_lb "$1"
    echo "$r $cpu $mach $p99"
}

# Reads `wrk --latency` output on stdin and prints "req/s p50_ms p99_ms
# requests". The one rule every script applies: a run with any failed request
# (a non-2xx/3xx answer, or a socket error: connect, read, write, timeout)
# prints "0 nan nan 0" and says why on stderr; a proxy gets no credit for the
# requests it failed. Output wrk cannot have produced prints the same.
wrk_parse() {
    awk '
        function ms(v) { # wrk latency: 812.00us, 1.97ms, 1.02s, 1.50m
            if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0
            if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return "nan" }
        { out = out "\n" $0 }
        /requests in/ { n = $1 } /Requests\/sec/ { r = $2 }
        $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
        /Non-2xx|Socket errors/ { bad = bad " " $0 }
        END {
            if (bad != "") print "wrk: failed requests, the run counts as 0:" bad > "/dev/stderr"
            else if (n == "" || r == "" || p50 == "" || p99 == "") print "unparsable wrk output:" out > "/dev/stderr"
            if (bad == "" && n > 0 && r != "" && p50 != "" && p99 != "") printf "%s %.3f %.3f %d\n", r, p50, p99, n
            else print "0 nan nan 0" }'
}

# The order for round ROUND: as given in odd rounds, reversed in even ones
# (A B C, C B A, ...), so that no one always runs after the same one: the
# position is worth up to 10% here. Sets ORDER.
round_order() { # ROUND ITEM...
    local round=$1 j
    shift
    ORDER=("$@")
    if [ $((round % 2)) = 0 ]; then
        ORDER=(); for ((j = $#; j >= 1; j--)); do ORDER+=("${!j}"); done
    fi
}
