#!/usr/bin/env bash
# What a TLS handshake's wait costs the client, through each proxy in turn:
# compare.sh's TLS workload (wrk -t1 -c50, a new resumed TLS connection and
# one request each, routed by SNI to the TLS nginx), with perf counting the
# results of wrk's read(2) calls per connection, and a Python client timing
# 300 handshakes of its own meanwhile. wrk keeps a connection registered
# for writability while OpenSSL waits for the server's handshake, so it
# calls SSL_connect, and read(2) fails with EAGAIN, on every turn of its
# event loop until the server's flight arrives: its CPU per connection, and
# with it the connections per second of a run where wrk takes a whole core,
# grow with how long the proxy takes to pass the handshake on under load
# (docs/benchmarks.md). Loopback only; stops everything it started.
#
#   bench/tls_wait.sh nginx target/release/tcplb        # 3 rounds, alternating
#   ROUNDS=5 bench/tls_wait.sh haproxy target/release/tcplb
#
# tcplb runs with its defaults. Needs perf with tracepoints (root), nginx,
# wrk, python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ $# -ge 1 ] || { echo "usage: bench/tls_wait.sh PROXY..." >&2; exit 2; }
for tool in perf nginx wrk python3; do
    command -v $tool >/dev/null || { echo "tls_wait.sh: needs $tool" >&2; exit 2; }
done
for who in "$@"; do require_lb "$who"; done
ROUNDS=${ROUNDS:-3}
export TCPLB_AS_SHIPPED=1

one_lb_setup tls-wait
tls_workload_setup

# Sequential handshakes (TLS 1.3, resumed after the first), µs: p50 p90.
cat > "$WORK/hs.py" <<'PY'
import socket, ssl, sys, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
session, took = None, []
for _ in range(300):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    t0 = time.perf_counter()
    c = ctx.wrap_socket(s, server_hostname="localhost", session=session)
    took.append((time.perf_counter() - t0) * 1e6)
    c.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    while c.recv(65536):
        pass
    session = c.session
    c.close()
took.sort()
print("%.0f %.0f" % (took[len(took) // 2], took[len(took) * 9 // 10]))
PY

printf '| round | proxy | conn/s | wrk reads a connection: EAGAIN | with data | handshake p50 µs | p90 |\n|---|---|---|---|---|---|---|\n'
for round in $(seq 1 "$ROUNDS"); do
    round_order "$round" "$@"
    for who in "${ORDER[@]}"; do
        start_lb "$WORK" "$who" "$(nproc)" $LB $B1 $B2
        wrk -t1 -c50 -d6 -H "Connection: close" "https://localhost:$LB/" > "$WORK/wrk.out" & WRK=$!
        sleep 1.5
        perf record -q -e syscalls:sys_exit_read -e syscalls:sys_enter_connect -p $WRK \
            -o "$WORK/perf.data" -- sleep 1 >/dev/null 2>&1
        read -r p50 p90 < <(python3 "$WORK/hs.py" $LB)
        wait $WRK
        stop_lb "$WORK"
        rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
        perf script -i "$WORK/perf.data" -F event,trace 2>/dev/null | python3 -c '
import sys
conns = again = data = 0
for line in sys.stdin:
    if not line.strip():
        continue
    if "connect" in line.split()[0]:
        conns += 1
        continue
    ret = int(line.split()[-1], 0)
    if ret >= 2**63:
        again += 1
    elif ret > 0:
        data += 1
print("| %s | %s | %.0f | %.2f | %.2f | %s | %s |" % (sys.argv[1], sys.argv[2], float(sys.argv[3]),
      again / max(conns, 1), data / max(conns, 1), sys.argv[4], sys.argv[5]))' \
            "$round" "$(basename "$who")" "$rps" "$p50" "$p90"
    done
done
