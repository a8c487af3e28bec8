#!/usr/bin/env bash
# New TLS connections per second: `upstream-pool bench` against `openssl s_time`, both serial
# (one connection at a time) against the same `openssl s_server -www` on loopback, full
# handshakes and resumed handshakes. Prints our rate / OpenSSL's rate (target >= 0.95: our
# per-connection overhead should vanish next to the crypto).
#
#   benches/compare_openssl.sh              # 10 s per run, 1 round
#   DURATION=20 ROUNDS=3 benches/compare_openssl.sh
#
# Needs: cargo, openssl (the command-line tool), ss (iproute2), bash >= 5, awk.
#
# Apples to apples:
# - s_time counts connections, `bench` counts requests. With `--reuse off` every request of
#   `bench` is a new connection (checked below: connections_opened == requests), and s_time
#   is run with `-www /`, so each side does, per connection: TCP connect, TLS handshake, one
#   `GET /`, read the response until the server closes (s_server -www answers one request
#   with a status page and closes), close. Without `-www`, s_time would only handshake.
# - Full handshakes: `s_time -new` vs `bench --resume off` (session cache off).
#   Resumed: `s_time -reuse` vs `bench --resume on` (each new connection offers the cached
#   session/ticket; the server's TLS 1.3 tickets are read with the response).
# - Both clients run on one thread: s_time is single-threaded, and `bench --threads 1` uses a
#   current-thread runtime (on the default multi-thread runtime every dial wakes the other
#   vCPU, which costs more kernel time than our own code on this machine).
# - Same server process, certificate (RSA 2048, self-signed, generated here), protocol
#   (TLS 1.3 by default on both sides), no SNI (the target is an IP address), no
#   certificate verification (`s_time` verifies nothing without -verify; `bench --insecure`).
# - Rates are counts (s_time's connections, bench's requests) over wall-clock time measured
#   here the same way for both (s_time's own "N real seconds" is rounded to whole seconds).
#   Also printed: connections per CPU-second of the client process (user + sys), which
#   compares the clients' own costs without the server's share of the wall time.
# - Runs alternate (OpenSSL, ours, OpenSSL, ours...) so both see the same machine load; with
#   ROUNDS > 1 the ratio of medians is printed.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
cd "$(dirname "$0")/.."

command -v openssl >/dev/null || { echo "compare_openssl: needs the openssl command-line tool" >&2; exit 2; }

echo "compare_openssl: building upstream-pool (release)" >&2
cargo build --release --quiet --bin upstream-pool
BIN=$PWD/target/release/upstream-pool

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null

# A free port below the ephemeral range (32768-60999), so no client socket can take it.
PORT=
for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 12000))
    if ! ss -Htln "sport = :$p" | grep -q .; then PORT=$p; break; fi
done
[ -n "$PORT" ] || { echo "compare_openssl: no free port found" >&2; exit 1; }

openssl s_server -accept "127.0.0.1:$PORT" -cert "$TMP/cert.pem" -key "$TMP/key.pem" \
    -www -quiet >"$TMP/s_server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    ss -Htln "sport = :$PORT" | grep -q . && break
    sleep 0.05
done
ss -Htln "sport = :$PORT" | grep -q . || { echo "compare_openssl: s_server did not start" >&2; cat "$TMP/s_server.log" >&2; exit 1; }

# Runs a command with stdout to $1, and prints "<wall s> <cpu s>" (cpu = user + sys of the
# command). s_time's own "N real seconds" is a whole number of seconds (and overshoots by up
# to one), so the wall time is measured here, the same way for both tools.
timed() {
    local out=$1; shift
    local t0 t1 cpu
    TIMEFORMAT='%U %S'
    t0=$EPOCHREALTIME
    cpu=$( { time "$@" >"$out" 2>"$out.err"; } 2>&1 ) || { echo "compare_openssl: $* failed:" >&2; cat "$out.err" >&2; exit 1; }
    t1=$EPOCHREALTIME
    awk -v a="$t0" -v b="$t1" -v c="$cpu" 'BEGIN { split(c, u, " "); printf "%.3f %.3f\n", b - a, u[1] + u[2] }'
}

# "<connections/s wall> <connections per client CPU-second>" for `s_time -new|-reuse`.
s_time_rate() {
    local t n
    t=$(timed "$TMP/s_time.out" openssl s_time -connect "127.0.0.1:$PORT" "$1" -www / -time "$DURATION")
    n=$(awk '/connections in [0-9]+ real seconds/ { print $1 }' "$TMP/s_time.out" | tail -1)
    [ -n "$n" ] || { echo "compare_openssl: cannot parse s_time output:" >&2; cat "$TMP/s_time.out" "$TMP/s_time.out.err" >&2; exit 1; }
    echo "$t" | awk -v n="$n" '{ printf "%.1f %.1f\n", n / $1, n / $2 }'
}

# A number field of bench's one-line JSON (first occurrence).
field() { grep -o "\"$2\":[0-9.eE+-]*" "$1" | head -1 | cut -d: -f2; }

# Same for `bench --reuse off --resume off|on`, after checking that every request was its
# own connection, that nothing failed, and that resumption did (not) happen as asked.
bench_rate() {
    local t json=$TMP/bench-$1.json req opened errors full resumed
    t=$(timed "$json" "$BIN" bench --target "127.0.0.1:$PORT" --insecure --reuse off \
        --resume "$1" --concurrency 1 --threads 1 --duration "${DURATION}s" --json)
    req=$(field "$json" requests); opened=$(field "$json" connections_opened)
    errors=$(field "$json" errors); full=$(field "$json" full); resumed=$(field "$json" resumed)
    [ -n "$req" ] && [ -n "$opened" ] || { echo "compare_openssl: cannot parse bench output:" >&2; cat "$json" >&2; exit 1; }
    [ "$errors" = 0 ] || { echo "compare_openssl: bench reported $errors errors: $(cat "$json")" >&2; exit 1; }
    [ $((req - opened)) -le 1 ] && [ $((opened - req)) -le 1 ] \
        || { echo "compare_openssl: $req requests but $opened connections: not one per request" >&2; exit 1; }
    if [ "$1" = off ] && [ "$resumed" != 0 ]; then
        echo "compare_openssl: --resume off resumed $resumed handshakes" >&2; exit 1
    fi
    if [ "$1" = on ] && [ $((resumed * 100)) -lt $(((full + resumed) * 95)) ]; then
        echo "compare_openssl: --resume on resumed only $resumed of $((full + resumed)) handshakes" >&2; exit 1
    fi
    echo "$t" | awk -v n="$req" '{ printf "%.1f %.1f\n", n / $1, n / $2 }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "compare_openssl: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(openssl version)" >&2
echo "compare_openssl: s_server on 127.0.0.1:$PORT, ${DURATION} s per run, $ROUNDS round(s)" >&2
for k in new.openssl new.ours reuse.openssl reuse.ours; do : >"$TMP/$k"; done
for round in $(seq 1 "$ROUNDS"); do
    a=$(s_time_rate -new);   echo "$a" >>"$TMP/new.openssl"
    b=$(bench_rate off);     echo "$b" >>"$TMP/new.ours"
    c=$(s_time_rate -reuse); echo "$c" >>"$TMP/reuse.openssl"
    d=$(bench_rate on);      echo "$d" >>"$TMP/reuse.ours"
    echo "compare_openssl: round $round (connections/s, connections/CPU-s): full: s_time $a, ours $b; resumed: s_time $c, ours $d" >&2
done

# col FILE N: median of column N
col() { awk -v n="$2" '{ print $n }' "$1" | median; }
# paired O U N: median over rounds of (ours / OpenSSL) in column N. The two runs of a round
# are back to back, so their ratio cancels most of the machine's drift between rounds.
paired() { paste "$TMP/$1" "$TMP/$2" | awk -v n="$3" '{ print $(n + 2) / $n }' | median; }
row() {
    local label=$1 o=$2 u=$3 c=$4
    awk -v l="$label" -v o="$(col "$TMP/$o" "$c")" -v u="$(col "$TMP/$u" "$c")" \
        -v p="$(paired "$o" "$u" "$c")" \
        'BEGIN { printf "%-36s %14.1f %14.1f %8.3f %8.3f\n", l, o, u, u / o, p }'
}
echo
echo "serial connections (TCP + TLS + one GET + close); medians of $ROUNDS round(s) of ${DURATION} s"
echo "(ours/ssl: ratio of the medians; paired: median of the per-round ratios)"
printf '%-36s %14s %14s %8s %8s\n' "" "openssl s_time" "upstream-pool" "ours/ssl" "paired"
row "full handshake, per second"        new.openssl   new.ours   1
row "full handshake, per client CPU-s"  new.openssl   new.ours   2
row "resumed, per second"               reuse.openssl reuse.ours 1
row "resumed, per client CPU-s"         reuse.openssl reuse.ours 2
