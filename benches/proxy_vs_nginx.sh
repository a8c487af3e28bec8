#!/usr/bin/env bash
# The example reverse proxy (examples/reverse_proxy.rs, release build) against nginx as a
# reverse proxy, both in front of the same TLS upstream, loaded with wrk over plain HTTP on
# loopback.
#
#   benches/proxy_vs_nginx.sh            # 10 s per run
#   DURATION=30 CONNECTIONS=64 ROUNDS=5 benches/proxy_vs_nginx.sh
#   PERF_OUT=/tmp/example.perf.txt benches/proxy_vs_nginx.sh   # also profile the example
#   H2=0 benches/proxy_vs_nginx.sh       # only the HTTP/1.1-upstream rows
#
# Needs: cargo, nginx, wrk, openssl, taskset, curl (Debian: apt-get install -y nginx wrk curl).
#
# Each configuration (proxy x concurrency) runs ROUNDS times, the two proxies alternating, and
# the median of each figure is reported, so a burst of unrelated load on the machine hurts one
# round rather than one proxy.
#
# Layout (per-core comparison): each proxy runs on ONE core (the example on a current-thread
# tokio runtime, `--threads 1`; nginx with `worker_processes 1`), pinned to CPU $PROXY_CPU.
# wrk and the upstream (nginx, `return 200` over TLS, 1 worker) share the other core(s). The
# proxies' CPU time is read from /proc, so besides requests/s the script prints requests per
# CPU-second of the proxy process (and the CPU time per request, user + system): if the
# client side saturates before a proxy's core does, that column is still a fair per-core
# comparison.
#
# Both proxies verify the upstream certificate and its name, resume TLS sessions and keep up
# to 64 idle upstream connections.
#
# HTTP/2 upstream rows (H2=1, the default): the same upstream nginx also listens with
# `ssl http2`; a second example process forwards to it with `--alpn h2` (one multiplexed
# connection carries many requests), and nginx reaches it with `grpc_pass grpcs://`, the only
# way nginx proxies to an HTTP/2 upstream. Clients still speak HTTP/1.1 (wrk) to both.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
WRK_THREADS=${WRK_THREADS:-1}
NCPU=$(nproc)
PROXY_CPU=${PROXY_CPU:-$((NCPU - 1))}
LOAD_CPUS=${LOAD_CPUS:-$( [ "$NCPU" -gt 1 ] && echo "0-$((NCPU - 2))" || echo 0 )}
UPSTREAM_PORT=${UPSTREAM_PORT:-18443}
EXAMPLE_PORT=${EXAMPLE_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
UPSTREAM_H2_PORT=${UPSTREAM_H2_PORT:-18444}
EXAMPLE_H2_PORT=${EXAMPLE_H2_PORT:-18082}
NGINX_GRPC_PORT=${NGINX_GRPC_PORT:-18083}
H2=${H2:-1}

root=$(cd "$(dirname "$0")/.." && pwd)
# Debian installs nginx in /usr/sbin, which is not on every PATH.
export PATH="$PATH:/usr/sbin"
for tool in cargo nginx wrk openssl taskset curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

work=$(mktemp -d /tmp/proxy-vs-nginx.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

wait_port() { # port
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on port $1" >&2
    return 1
}

for port in "$UPSTREAM_PORT" "$EXAMPLE_PORT" "$NGINX_PORT" "$UPSTREAM_H2_PORT" "$EXAMPLE_H2_PORT" \
    "$NGINX_GRPC_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is already in use (set UPSTREAM_PORT / EXAMPLE_PORT / NGINX_PORT / ..._H2_PORT)" >&2
        exit 1
    fi
done

# --- certificates: a CA and a leaf for localhost / 127.0.0.1 (EC P-256, as the tests use).
cd "$work"
. "$root/benches/common/pki.sh"
make_localhost_pki

nginx_conf_common='daemon off;
master_process off;
worker_processes 1;
events { worker_connections 4096; }'
nginx_http_common="access_log off;
    client_body_temp_path $work/body; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
    keepalive_requests 1000000;"

start_nginx() { # name cpus
    local name=$1 cpus=$2
    mkdir -p "$work/$name"
    taskset -c "$cpus" nginx -p "$work/$name" -c "$work/$name.conf" -e "$work/$name/error.log" &
    pids+=($!)
}

# --- the upstream: nginx over TLS answering every request itself.
cat > upstream.conf <<EOF
$nginx_conf_common
pid $work/upstream/nginx.pid;
http {
    $nginx_http_common
    keepalive_timeout 75s;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT ssl backlog=4096;
        ssl_certificate $work/server.pem;
        ssl_certificate_key $work/server.key;
        location / { return 200 "hello from the upstream\n"; }
        location = /status { stub_status; }
    }
    server {
        listen 127.0.0.1:$UPSTREAM_H2_PORT ssl http2 backlog=4096;
        http2_max_concurrent_streams 128;
        ssl_certificate $work/server.pem;
        ssl_certificate_key $work/server.key;
        location / { return 200 "hello from the upstream\n"; }
    }
}
EOF
start_nginx upstream "$LOAD_CPUS"
wait_port "$UPSTREAM_PORT"

# --- (a) the example proxy.
echo "building the example (release)..." >&2
(cd "$root" && cargo build --release --example reverse_proxy -q)
taskset -c "$PROXY_CPU" "$root/target/release/examples/reverse_proxy" \
    --listen "127.0.0.1:$EXAMPLE_PORT" --upstream "127.0.0.1:$UPSTREAM_PORT" \
    --sni localhost --ca "$work/ca.pem" --alpn h1 --threads 1 2>"$work/example.log" &
example_pid=$!
pids+=($example_pid)
wait_port "$EXAMPLE_PORT"
example_h2_pid=
if [ "$H2" = 1 ]; then
    taskset -c "$PROXY_CPU" "$root/target/release/examples/reverse_proxy" \
        --listen "127.0.0.1:$EXAMPLE_H2_PORT" --upstream "127.0.0.1:$UPSTREAM_H2_PORT" \
        --sni localhost --ca "$work/ca.pem" --alpn h2 --threads 1 2>"$work/example-h2.log" &
    example_h2_pid=$!
    pids+=($example_h2_pid)
    wait_port "$EXAMPLE_H2_PORT"
fi

# --- (b) nginx as the reverse proxy.
cat > proxy.conf <<EOF
$nginx_conf_common
pid $work/proxy/nginx.pid;
http {
    $nginx_http_common
    keepalive_timeout 75s;
    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000; # default 1000: nginx would redial every 1,000 requests
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass https://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_session_reuse on;
            proxy_ssl_server_name on;
            proxy_ssl_name localhost;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $work/ca.pem;
        }
    }
    upstream backend_h2 {
        server 127.0.0.1:$UPSTREAM_H2_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_GRPC_PORT backlog=4096;
        location / {
            grpc_pass grpcs://backend_h2;
            grpc_ssl_session_reuse on;
            grpc_ssl_server_name on;
            grpc_ssl_name localhost;
            grpc_ssl_verify on;
            grpc_ssl_trusted_certificate $work/ca.pem;
        }
    }
}
EOF
start_nginx proxy "$PROXY_CPU"
nginx_pid=$!
wait_port "$NGINX_PORT"

# Sanity: both answer with the upstream's body; the example reports reuse.
sanity_ports=("$EXAMPLE_PORT" "$NGINX_PORT")
[ "$H2" = 1 ] && sanity_ports+=("$EXAMPLE_H2_PORT" "$NGINX_GRPC_PORT")
for port in "${sanity_ports[@]}"; do
    body=$(curl -fsS "http://127.0.0.1:$port/")
    [ "$body" = "hello from the upstream" ] || { echo "port $port answered: $body" >&2; exit 1; }
done
curl -fsS -D - -o /dev/null "http://127.0.0.1:$EXAMPLE_PORT/" | grep -qi '^x-upstream-reused: true' \
    || { echo "the example proxy did not reuse its upstream connection" >&2; exit 1; }

cpu_ticks() { # pid -> "utime stime" in clock ticks
    awk '{ print $14, $15 }' "/proc/$1/stat"
}
upstream_accepts() { # connections the upstream has accepted so far
    curl -fsSk "https://127.0.0.1:$UPSTREAM_PORT/status" | awk 'NR == 3 { print $1 }'
}
upstream_conns() { # pid upstream_port -> established connections from that process to it
    ss -Htnp state established "( dport = :$2 )" | grep -c "pid=$1," || true
}
to_us() { # wrk latency ("812.00us", "1.25ms", "2.01s") -> microseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000
        else print n
    }'
}
median() { # numbers on stdin -> median
    sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

HZ=$(getconf CLK_TCK)
results="$work/results.tsv" # label conns round rps p50_us p99_us cpu_pct us_per_req user_us sys_us
: > "$results"

run() { # label port pid connections round upstream_port
    local label=$1 port=$2 pid=$3 conns=$4 round=$5 upstream_port=$6
    # Warm up: connections, TLS sessions, caches.
    taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null
    local before after accepts_before accepts_after out perf_pid=""
    if [ -n "${PERF_OUT:-}" ] && [ "$conns" = "$CONNECTIONS" ] && [ "$round" = 1 ]; then
        perf record -q -F 499 -g --call-graph dwarf,32768 -o "$work/$label.perf.data" \
            -p "$pid" -- sleep "$DURATION" 2>/dev/null &
        perf_pid=$!
    fi
    before=$(cpu_ticks "$pid")
    accepts_before=$(upstream_accepts)
    out=$(taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" --latency \
        "http://127.0.0.1:$port/")
    after=$(cpu_ticks "$pid")
    accepts_after=$(upstream_accepts)
    if [ -n "$perf_pid" ]; then
        wait "$perf_pid" || true
        {
            echo "### $label, c=$conns: self time by symbol"
            perf report -i "$work/$label.perf.data" --no-children --sort symbol \
                --percent-limit 0.7 --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$'
            echo "### $label, c=$conns: inclusive time (children), by symbol"
            perf report -i "$work/$label.perf.data" --children --sort symbol \
                --percent-limit 3 --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$'
        } >> "$PERF_OUT"
    fi
    if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then
        echo "$out" >&2
        echo "errors during the $label run" >&2
        exit 1
    fi
    local rps p50 p99 requests
    rps=$(awk '/^Requests\/sec/ { print $2 }' <<<"$out")
    p50=$(to_us "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_us "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    read -r u1 s1 <<<"$before"
    read -r u2 s2 <<<"$after"
    awk -v OFS='\t' -v l="$label" -v c="$conns" -v r="$round" -v rps="$rps" -v p50="$p50" \
        -v p99="$p99" -v n="$requests" -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v hz="$HZ" \
        -v d="$DURATION" 'BEGIN {
            print l, c, r, rps, p50, p99, 100 * (u + s) / hz / d, 1e6 * (u + s) / hz / n,
                1e6 * u / hz / n, 1e6 * s / hz / n
        }' >> "$results"
    # "dialled": upstream accepts during the run, less the status request's own connection.
    echo "round $round $label c=$conns: $rps req/s, p50 ${p50}us, p99 ${p99}us," \
        "proxy CPU $(tail -1 "$results" | cut -f7 | xargs printf '%.0f')%," \
        "$(tail -1 "$results" | cut -f8 | xargs printf '%.1f') us CPU/request," \
        "upstream connections open $(upstream_conns "$pid" "$upstream_port")," \
        "dialled during the run $((accepts_after - accepts_before - 1))" >&2
}

for round in $(seq "$ROUNDS"); do
    for conns in 1 "$CONNECTIONS"; do
        if [ $((round % 2)) = 1 ]; then
            run example "$EXAMPLE_PORT" "$example_pid" "$conns" "$round" "$UPSTREAM_PORT"
            run nginx "$NGINX_PORT" "$nginx_pid" "$conns" "$round" "$UPSTREAM_PORT"
        else
            run nginx "$NGINX_PORT" "$nginx_pid" "$conns" "$round" "$UPSTREAM_PORT"
            run example "$EXAMPLE_PORT" "$example_pid" "$conns" "$round" "$UPSTREAM_PORT"
        fi
        [ "$H2" = 1 ] || continue
        if [ $((round % 2)) = 1 ]; then
            run example-h2 "$EXAMPLE_H2_PORT" "$example_h2_pid" "$conns" "$round" "$UPSTREAM_H2_PORT"
            run nginx-grpc "$NGINX_GRPC_PORT" "$nginx_pid" "$conns" "$round" "$UPSTREAM_H2_PORT"
        else
            run nginx-grpc "$NGINX_GRPC_PORT" "$nginx_pid" "$conns" "$round" "$UPSTREAM_H2_PORT"
            run example-h2 "$EXAMPLE_H2_PORT" "$example_h2_pid" "$conns" "$round" "$UPSTREAM_H2_PORT"
        fi
        # Upstream connections each HTTP/2-upstream proxy holds after the run.
        for pair in "example-h2 $example_h2_pid" "nginx-grpc $nginx_pid"; do
            read -r label pid <<<"$pair"
            printf '%s\t%s\t%s\t%s\n' "$label" "$conns" "$round" \
                "$(upstream_conns "$pid" "$UPSTREAM_H2_PORT")" >> "$work/h2conns.tsv"
        done
    done
done

med() { # label conns column -> median over rounds
    awk -v l="$1" -v c="$2" -v k="$3" -F'\t' '$1 == l && $2 == c { print $k }' "$results" | median
}

echo
echo "machine: $NCPU cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), $(openssl version | awk '{print $1 " " $2}'), $(rustc --version | awk '{print $1 " " $2}')"
echo "layout: proxy on CPU $PROXY_CPU (1 thread / 1 worker); wrk (-t$WRK_THREADS) and upstream nginx on CPU $LOAD_CPUS"
echo "runs: ${DURATION}s each, $ROUNDS rounds, medians shown; CPU pressure while running: $(awk '/some/ { print $2 }' /proc/pressure/cpu 2>/dev/null || echo n/a)"
echo
labels=(example nginx)
[ "$H2" = 1 ] && labels+=(example-h2 nginx-grpc)
printf '%-10s %5s %10s %9s %9s %9s %11s %9s %9s\n' proxy conns "req/s" "p50 us" "p99 us" "CPU %" "CPU us/req" "user us" "sys us"
for conns in 1 "$CONNECTIONS"; do
    for label in "${labels[@]}"; do
        printf '%-10s %5s %10.0f %9.0f %9.0f %9.0f %11.1f %9.1f %9.1f\n' "$label" "$conns" \
            "$(med "$label" "$conns" 4)" "$(med "$label" "$conns" 5)" "$(med "$label" "$conns" 6)" \
            "$(med "$label" "$conns" 7)" "$(med "$label" "$conns" 8)" "$(med "$label" "$conns" 9)" \
            "$(med "$label" "$conns" 10)"
    done
done
echo
for conns in 1 "$CONNECTIONS"; do
    awk -v a="$(med example "$conns" 4)" -v b="$(med nginx "$conns" 4)" \
        -v ca="$(med example "$conns" 8)" -v cb="$(med nginx "$conns" 8)" -v c="$conns" \
        'BEGIN { printf "example/nginx at c=%s: %.2f x the requests/s; %.2f x the requests per CPU-second (nginx CPU/request / example CPU/request)\n", c, a / b, cb / ca }'
done
if [ "$H2" = 1 ]; then
    for conns in 1 "$CONNECTIONS"; do
        awk -v a="$(med example-h2 "$conns" 4)" -v b="$(med nginx-grpc "$conns" 4)" \
            -v ca="$(med example-h2 "$conns" 8)" -v cb="$(med nginx-grpc "$conns" 8)" -v c="$conns" \
            'BEGIN { printf "example-h2/nginx-grpc at c=%s: %.2f x the requests/s; %.2f x the requests per CPU-second\n", c, a / b, cb / ca }'
    done
    for label in example-h2 nginx-grpc; do
        echo "$label: upstream HTTP/2 connections open after each c=$CONNECTIONS run:" \
            "$(awk -v l="$label" -v c="$CONNECTIONS" -F'\t' '$1 == l && $2 == c { printf "%s ", $4 }' "$work/h2conns.tsv")"
    done
fi
