#!/usr/bin/env bash
# Idle memory per pooled TLS connection, ours against bare tokio-openssl, side by side:
# examples/idle_memory.rs (release build) in four modes against two upstreams.
#
#   benches/idle_memory_vs_bare.sh                 # 3,000 connections, one request each
#   N=1000 ROUNDS=3 benches/idle_memory_vs_bare.sh # the median of 3 runs per row
#   REQUEST=0 benches/idle_memory_vs_bare.sh       # handshake only, no request
#
# Needs: cargo, nginx, openssl (Debian: apt-get install -y nginx).
#
# Modes (see the example's documentation): bare-full (SslConnector + tokio_openssl::SslStream,
# full handshakes), bare-resumed (the same, offering the newest session), ours-resumed (the
# library's defaults), ours-full (resumption off). Upstreams: nginx over TLS on loopback
# (certificates from the openssl CLI, keepalive_timeout and keepalive_requests high, so it
# holds every connection), and the example's own child-process server.
#
# Each figure is the growth of the client's VmRSS per idle connection, taken after the
# connections sat idle for 1.5 s (ours: the reaper passed over each and read the TLS 1.3
# tickets). Bare code never reads while idle; its figure is the one after one non-blocking
# read on every stream (the "as is" figure, tickets still in the kernel, is printed next to
# it). "heap" is glibc's count of bytes in use (mallinfo2) per connection: RSS minus heap is
# allocator overhead and fragmentation. Every run checks that the server holds the
# connections (nginx stub_status, the child's /stats). Ratios are against bare-full on the
# same upstream.
set -euo pipefail

N=${N:-3000}
ROUNDS=${ROUNDS:-1}
REQUEST=${REQUEST:-1}
NGINX_PORT=${NGINX_PORT:-18543}

root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$PATH:/usr/sbin"
for tool in cargo nginx openssl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
if (exec 3<>"/dev/tcp/127.0.0.1/$NGINX_PORT") 2>/dev/null; then
    echo "port $NGINX_PORT is already in use (set NGINX_PORT)" >&2
    exit 1
fi

work=$(mktemp -d /tmp/idle-memory-vs-bare.XXXXXX)
nginx_pid=
cleanup() {
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# --- certificates: a CA and a leaf for localhost (EC P-256, as the tests use).
cd "$work"
. "$root/benches/common/pki.sh"
make_localhost_pki

# --- nginx: TLS, keep-alive long enough to hold every connection through a run.
mkdir -p "$work/nginx"
cat > nginx.conf <<EOF
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile $((2 * N + 1024));
pid $work/nginx/nginx.pid;
events { worker_connections $((2 * N + 512)); }
http {
    access_log off;
    client_body_temp_path $work/body; proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    server {
        listen 127.0.0.1:$NGINX_PORT ssl backlog=4096;
        ssl_certificate $work/server.pem;
        ssl_certificate_key $work/server.key;
        location / { return 200 "ok\n"; }
        location = /status { stub_status; }
    }
}
EOF
ulimit -n "$(ulimit -Hn)"
nginx -p "$work/nginx" -c "$work/nginx.conf" -e "$work/nginx/error.log" &
nginx_pid=$!
for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NGINX_PORT") 2>/dev/null && break
    sleep 0.05
done

echo "building the example (release)..." >&2
(cd "$root" && cargo build --release --example idle_memory -q)
example="$root/target/release/examples/idle_memory"
request_flag=()
[ "$REQUEST" = 1 ] && request_flag=(--request)

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(cd "$root" && git rev-parse --short HEAD)," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg), nginx $(nginx -v 2>&1 | cut -d/ -f2)," \
    "$(openssl version | cut -d' ' -f1-2), N=$N, request=$REQUEST, rounds=$ROUNDS"

declare -A rss heap asis resumed
modes=(bare-full bare-resumed ours-resumed ours-full)
flag_of() {
    case $1 in
        bare-full) echo --bare ;;
        bare-resumed) echo --bare-resumed ;;
        ours-resumed) echo ;;
        ours-full) echo --full ;;
    esac
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
field() { tr ' ' '\n' | sed -n "s/^$1=//p"; }

for upstream in nginx child; do
    for mode in "${modes[@]}"; do
        r=() h=() a=() res=
        for _ in $(seq "$ROUNDS"); do
            args=("$N" "${request_flag[@]}")
            flag=$(flag_of "$mode")
            [ -n "$flag" ] && args+=("$flag")
            if [ "$upstream" = nginx ]; then
                args+=(--upstream "127.0.0.1:$NGINX_PORT" --ca "$work/ca.pem" --sni localhost)
            fi
            line=$("$example" "${args[@]}" | grep '^RESULT')
            echo "  $upstream $mode: $line" >&2
            r+=("$(echo "$line" | field rss_per_kib)")
            h+=("$(echo "$line" | field heap_per_kib)")
            a+=("$(echo "$line" | field rss_as_is_per_kib)")
            res=$(echo "$line" | field resumed)
        done
        rss[$upstream,$mode]=$(printf '%s\n' "${r[@]}" | median)
        heap[$upstream,$mode]=$(printf '%s\n' "${h[@]}" | median)
        asis[$upstream,$mode]=$(printf '%s\n' "${a[@]}" | median)
        resumed[$upstream,$mode]=$res
    done
done

echo
echo "| upstream | client | resumed of $N | RSS per idle connection (KiB) | vs bare-full | heap in use (KiB) | RSS as is (KiB) |"
echo "|---|---|---:|---:|---:|---:|---:|"
for upstream in nginx child; do
    base=${rss[$upstream,bare-full]}
    for mode in "${modes[@]}"; do
        v=${rss[$upstream,$mode]}
        ratio=$(awk -v v="$v" -v b="$base" 'BEGIN { printf "%.2fx", v / b }')
        echo "| $upstream | $mode | ${resumed[$upstream,$mode]} | $v | $ratio | ${heap[$upstream,$mode]} | ${asis[$upstream,$mode]} |"
    done
done
