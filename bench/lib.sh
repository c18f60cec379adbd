# Shared by the bench scripts (sourced, not run).

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

# Starts one nginx serving a short body on two ports (the HTTP backends);
# its pid goes to DIR/nginx-be.pid.
start_http_backends() { # DIR PORT1 PORT2
    cat > "$1/nginx-be.conf" <<CONF
worker_processes 1;
pid $1/nginx-be.pid;
error_log $1/nginx-be.err;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$2 backlog=4096; location / { return 200 "hello from backend\n"; } }
    server { listen 127.0.0.1:$3 backlog=4096; location / { return 200 "hello from backend\n"; } }
}
CONF
    nginx -c "$1/nginx-be.conf"
}

# The [defaults] every benchmarked tcplb runs with: plain TCP (no HTTP
# first-exchange watch) and no access log, as the peers are configured.
tcplb_defaults() {
    printf '[defaults]\nprotocol = "tcp"\naccess_log = false\n'
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
TICK_US=$((1000000 / $(getconf CLK_TCK)))
