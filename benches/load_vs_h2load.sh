#!/usr/bin/env bash
# `upstream-pool bench` as a load generator, against the tools people reach for, on the same
# nginx TLS listener (`listen ... ssl http2`, which speaks HTTP/2 or HTTP/1.1 by ALPN):
#
#   - HTTP/2: `bench --alpn h2 -c C` vs `h2load -c 1 -m C` (C streams in flight, multiplexed
#     over the fewest connections nginx's stream limit allows: one, at C <= 128);
#   - HTTP/1.1: `bench --alpn h1 -c C1` vs `wrk -c C1` (C1 keep-alive connections).
#
#   benches/load_vs_h2load.sh                    # 10 s per run, 3 rounds, C=64, C1=16
#   DURATION=5 ROUNDS=1 CONCURRENCY=64 H1_CONCURRENCY=16 benches/load_vs_h2load.sh
#
# Needs: cargo, nginx, h2load (Debian: nghttp2-client), wrk, openssl, taskset, /usr/bin/time.
#
# One thread each: `bench --threads 1` (a current-thread tokio runtime), `h2load -t 1`,
# `wrk -t 1`, each pinned to CPU $LOAD_CPU; nginx runs one worker pinned to CPU $SERVER_CPU.
# Same certificate, TLS 1.3, session resumption irrelevant (connections stay open). Reported:
# requests/s (each tool's own count over its own run time), and the load tool's CPU time per
# request (user + sys from /usr/bin/time), which compares the clients' own costs even when
# the server's core is what saturates. Runs alternate (tool, bench, tool, bench...) and the
# ratio of the medians is printed.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-64}
H1_CONCURRENCY=${H1_CONCURRENCY:-16}
NCPU=$(nproc)
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-$((NCPU - 1))}
PORT=${PORT:-18445}

root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/sbin"
for tool in cargo nginx h2load wrk openssl taskset; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "missing: /usr/bin/time (Debian: time)" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "port $PORT is already in use (set PORT)" >&2
    exit 1
fi

echo "building upstream-pool (release)..." >&2
(cd "$root" && cargo build --release --quiet --bin upstream-pool)
BIN=$root/target/release/upstream-pool

work=$(mktemp -d /tmp/load-vs-h2load.XXXXXX)
nginx_pid=
cleanup() {
    if [ -n "$nginx_pid" ]; then kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

. "$root/benches/common/pki.sh"
make_localhost_pki

mkdir -p nginx
cat > nginx.conf <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/body; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
    keepalive_requests 100000000;   # also bounds requests per HTTP/2 connection (then GOAWAY)
    keepalive_timeout 75s;
    server {
        listen 127.0.0.1:$PORT ssl http2 backlog=4096;
        http2_max_concurrent_streams 128;
        ssl_certificate $work/server.pem;
        ssl_certificate_key $work/server.key;
        location / { return 200 "hello from nginx\n"; }
    }
}
CONF
taskset -c "$SERVER_CPU" nginx -p "$work/nginx" -c "$work/nginx.conf" -e "$work/nginx/error.log" &
nginx_pid=$!
for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.05
done

url="https://127.0.0.1:$PORT/"
results=$work/results.tsv # label round rps cpu_us_per_req connections
: > "$results"

timed() { # command... ; CPU seconds (user + sys) of it go to $work/cpu
    /usr/bin/time -f '%U %S' -o "$work/cpu" taskset -c "$LOAD_CPU" "$@"
}
cpu_secs() { awk '{ print $1 + $2 }' "$work/cpu"; }
record() { # label round rps requests
    awk -v OFS='\t' -v l="$1" -v r="$2" -v rps="$3" -v n="$4" -v cpu="$(cpu_secs)" \
        'BEGIN { print l, r, rps, (n > 0 ? 1e6 * cpu / n : 0) }' >> "$results"
    echo "round $2 $1: $3 req/s, $(tail -1 "$results" | cut -f4 | xargs printf '%.2f') us client CPU/request" >&2
}

run_h2load() { # round
    local out
    out=$(timed h2load -t 1 -c 1 -m "$CONCURRENCY" -D "$DURATION" "$url" 2>&1)
    grep -q "requests: .* 0 failed, 0 errored" <<<"$out" || { echo "$out" >&2; echo "h2load failed" >&2; exit 1; }
    record h2load "$1" "$(awk '/^finished in/ { print $4 }' <<<"$out")" \
        "$(awk '/^requests:/ { print $8 }' <<<"$out")"
}
run_wrk() { # round
    local out
    out=$(timed wrk -t 1 -c "$H1_CONCURRENCY" -d "${DURATION}s" "$url")
    if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then echo "$out" >&2; exit 1; fi
    record wrk "$1" "$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")" \
        "$(awk '/requests in/ { print $1 }' <<<"$out")"
}
run_bench() { # label alpn concurrency round
    local json
    json=$(timed "$BIN" bench --target "127.0.0.1:$PORT" --sni localhost --ca "$work/ca.pem" \
        --alpn "$2" -c "$3" --threads 1 -d "$DURATION" --json)
    local rps requests errors conns proto
    read -r rps requests errors conns proto < <(python3 -c '
import json, sys
v = json.loads(sys.stdin.read())
print(v["requests_per_sec"], v["requests"], v["errors"], v["connections_opened"], v.get("protocol"))
' <<<"$json")
    [ "$errors" = 0 ] || { echo "$json" >&2; echo "bench reported errors" >&2; exit 1; }
    record "$1" "$4" "$rps" "$requests"
    echo "    ($proto, $conns connections opened)" >&2
}

for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        run_h2load "$round"; run_bench bench-h2 h2 "$CONCURRENCY" "$round"
        run_wrk "$round"; run_bench bench-h1 h1 "$H1_CONCURRENCY" "$round"
    else
        run_bench bench-h2 h2 "$CONCURRENCY" "$round"; run_h2load "$round"
        run_bench bench-h1 h1 "$H1_CONCURRENCY" "$round"; run_wrk "$round"
    fi
done

median() {
    sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
med() { awk -v l="$1" -v k="$2" -F'\t' '$1 == l { print $k }' "$results" | median; }

echo
echo "machine: $NCPU cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(h2load --version | head -1), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), $(openssl version | awk '{print $1 " " $2}')"
echo "layout: nginx (1 worker) on CPU $SERVER_CPU; load tool (1 thread) on CPU $LOAD_CPU; ${DURATION}s runs, $ROUNDS rounds, medians"
echo
printf '%-9s %11s %10s %16s\n' tool concurrency "req/s" "CPU us/request"
for row in "h2load $CONCURRENCY" "bench-h2 $CONCURRENCY" "wrk $H1_CONCURRENCY" "bench-h1 $H1_CONCURRENCY"; do
    read -r label c <<<"$row"
    printf '%-9s %11s %10.0f %16.2f\n' "$label" "$c" "$(med "$label" 3)" "$(med "$label" 4)"
done
echo
awk -v a="$(med bench-h2 3)" -v b="$(med h2load 3)" -v ca="$(med bench-h2 4)" -v cb="$(med h2load 4)" \
    -v c="$CONCURRENCY" 'BEGIN { printf "bench --alpn h2 / h2load at c=%s: %.2f x the requests/s; %.2f x the requests per client CPU-second\n", c, a / b, cb / ca }'
awk -v a="$(med bench-h1 3)" -v b="$(med wrk 3)" -v ca="$(med bench-h1 4)" -v cb="$(med wrk 4)" \
    -v c="$H1_CONCURRENCY" 'BEGIN { printf "bench --alpn h1 / wrk at c=%s: %.2f x the requests/s; %.2f x the requests per client CPU-second\n", c, a / b, cb / ca }'
