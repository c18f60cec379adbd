#!/usr/bin/env bash
# Instructions a connection in one or two tcplb builds, counted by
# valgrind's callgrind while wrk carries connections through them
# (conn-close, or WORKLOAD=tls: compare.sh's TLS-by-SNI workload; or
# instructions a request with WORKLOAD=keep-alive, on CONNS connections
# that wrk keeps open). Counts,
# not times: they do not move with the shared machine's load, so a change
# of a few hundred instructions a connection (1%) shows where a CPU A/B of
# many rounds cannot. They count user space only (not the kernel's work for
# the syscalls), and one instruction is not one cycle: what this shows, a
# CPU A/B (bench/ab.sh) must still confirm. Under valgrind the proxy runs
# about 50 times slower and its threads one at a time, so it parks more
# often than under real load, and the runtime's parking counts for more.
# Loopback only; stops everything it started.
#
#   bench/instructions.sh target/release/tcplb              # tcplb as shipped (its defaults)
#   bench/instructions.sh /tmp/tcplb-before target/release/tcplb   # two builds, rounds alternating
#   WORKLOAD=tls bench/instructions.sh target/release/tcplb
#   WORKLOAD=keep-alive bench/instructions.sh target/release/tcplb
#   TOP=40 bench/instructions.sh target/release/tcplb       # more functions in the profile
#
# ROUNDS (default 3) runs of DURATION seconds (default 5) with CONNS
# concurrent wrk connections (default 8) per build; the medians of the
# per-connection counts, then, for the last round of each build, the
# functions with the most instructions a connection: inclusive for tcplb's
# own, self for all. The last round's callgrind file is kept in
# KEEP (a directory, default none) for callgrind_annotate or kcachegrind.
#
# Needs valgrind (Debian: valgrind), nginx, wrk.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: bench/instructions.sh TCPLB_BINARY [TCPLB_BINARY_B]" >&2; exit 2; }
WORKERS=${WORKERS:-$(nproc)}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-8}
TOP=${TOP:-25}
URL_BASE=http://127.0.0.1:
# wrk's header for each request: none on keep-alive.
CLOSE=(-H "Connection: close")
UNIT=connection
case ${WORKLOAD:=close} in
    close) ;;
    tls) URL_BASE=https://localhost: ;;
    keep-alive) CLOSE=() UNIT=request ;;
    *) echo "instructions.sh: WORKLOAD must be close, tls or keep-alive, not '$WORKLOAD'" >&2; exit 2 ;;
esac
for tool in valgrind callgrind_control callgrind_annotate nginx wrk; do
    command -v $tool >/dev/null || { echo "instructions.sh: needs $tool (Debian: valgrind, nginx, wrk)" >&2; exit 2; }
done
for bin in "$@"; do
    case $bin in
        nginx | haproxy | haproxy-splice | floor) echo "instructions.sh: counts tcplb builds only, not $bin" >&2; exit 2 ;;
    esac
    require_lb "$bin"
done

export TCPLB_AS_SHIPPED=${TCPLB_AS_SHIPPED:-1}
one_lb_setup instructions
if [ "$WORKLOAD" = tls ]; then tls_workload_setup; fi

# The instructions callgrind counted in FILE.
total() { # FILE
    callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
}

# One round of BIN under callgrind: a warm-up, the counters zeroed, a
# measured wrk run, a dump. Prints the instructions a connection; the
# dump is left in OUT.1.
measure() { # BIN OUT
    local bin=$1 out=$2 wrapper="$WORK/under-callgrind" n ir
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s "%s" "$@"\n' "$out" "$bin" > "$wrapper"
    chmod +x "$wrapper"
    rm -f "$out" "$out".*
    start_lb "$WORK" "$wrapper" "$WORKERS" $LB $B1 $B2
    for _ in $(seq 1 300); do
        (exec 3<>/dev/tcp/127.0.0.1/$LB) 2>/dev/null && break
        sleep 0.2
    done
    wrk -t1 -c"$CONNS" -d2 "${CLOSE[@]}" "$URL_BASE$LB/" >/dev/null
    callgrind_control -z "$LB_PID" >/dev/null 2>&1
    n=$(wrk -t1 -c"$CONNS" -d"$DURATION" "${CLOSE[@]}" "$URL_BASE$LB/" | awk '/requests in/ {print $1}')
    callgrind_control -d "$LB_PID" >/dev/null 2>&1
    stop_lb "$WORK"
    ir=$(total "$out.1")
    [ -n "$n" ] && [ "$n" -gt 0 ] && [ -n "$ir" ] || { echo "instructions.sh: no count for $bin (see $WORK/tcplb.log)" >&2; exit 1; }
    awk -v ir="$ir" -v n="$n" 'BEGIN { printf "%.0f\n", ir / n }'
    echo "$n" > "$out.n"
}

# The functions with the most instructions a connection in callgrind FILE
# (N connections): tcplb's own inclusive of what they call, then any by
# their own instructions (without the threads' entry points, which callgrind
# lists with everything under them).
profile() { # FILE N
    echo "tcplb's functions, instructions a $UNIT with what they call:"
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
        awk -v n="$2" -v top="$TOP" '/ \?\?\?:tcplb::/ && c < top { v = $1; gsub(",", "", v); sub(/^ *[0-9,]+ *(\([^)]*\))? */, ""); sub(/ \[.*/, ""); printf "%8.0f  %s\n", v / n, $0; c++ }'
    echo "all functions, their own instructions a $UNIT:"
    callgrind_annotate --threshold=100 "$1" 2>/dev/null |
        awk -v n="$2" -v top="$TOP" -v all="$(total "$1")" '/^ *[0-9,]+ .*:/ && !/PROGRAM TOTALS/ && c < top { t = $1; gsub(",", "", t); if (t + 0 > all / 2) next; v = $1; gsub(",", "", v); sub(/^ *[0-9,]+ *(\([^)]*\))? */, ""); sub(/ \[.*/, ""); printf "%8.0f  %s\n", v / n, $0; c++ }'
}

BINS=("$@")
declare -A COUNTS
for ((r = 1; r <= ROUNDS; r++)); do
    round_order "$r" "${!BINS[@]}"
    for i in "${ORDER[@]}"; do
        c=$(measure "${BINS[$i]}" "$WORK/cg.$i")
        COUNTS[$i]="${COUNTS[$i]:-} $c"
        echo "round $r: ${BINS[$i]}: $c instructions a $UNIT"
    done
done
echo
median() { tr ' ' '\n' | awk 'NF' | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for i in "${!BINS[@]}"; do
    m=$(echo "${COUNTS[$i]}" | median)
    echo "${BINS[$i]} ($WORKLOAD): median $m instructions a $UNIT over $ROUNDS rounds (${COUNTS[$i]# })"
    [ "$i" = 0 ] && M0=$m
done
[ ${#BINS[@]} = 2 ] && awk -v a="$M0" -v b="$(echo "${COUNTS[1]}" | median)" 'BEGIN { printf "B/A: %.3fx\n", b / a }'
for i in "${!BINS[@]}"; do
    echo
    echo "== ${BINS[$i]}, last round"
    profile "$WORK/cg.$i.1" "$(cat "$WORK/cg.$i.n")"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$WORK/cg.$i.1" "$KEEP/callgrind.$i.out"
    fi
done
