#!/usr/bin/env bash
# Where the bytes of an idle pooled TLS connection go: runs examples/idle_memory.rs (release
# build) under heaptrack and groups what is still allocated when it exits (it exits holding
# every connection idle) with heap_breakdown.py.
#
#   benches/idle_memory/heap_profile.sh 1000 --request                 # ours, child upstream
#   benches/idle_memory/heap_profile.sh 1000 --bare --request --upstream 127.0.0.1:8443 --ca ca.pem
#
# Arguments are the example's (the first one is N). Needs heaptrack (Debian: apt-get install
# heaptrack). Keep N around 1,000: heaptrack slows the handshakes down several times.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
n=$1
out=$(mktemp -d /tmp/idle-memory-heap.XXXXXX)
trap 'rm -rf "$out"' EXIT
(cd "$root" && cargo build --release --example idle_memory -q)
heaptrack -o "$out/run" "$root/target/release/examples/idle_memory" "$@" | grep -E '^(idle_memory|RESULT)'
heaptrack_print -f "$out/run.zst" -p 0 -a 0 -T 0 --flamegraph-cost-type leaked -F "$out/stacks" >/dev/null
# N new connections (ours reuses the warm-up one as the first of N; the breakdown divides
# by N either way, so one-time allocations show up as a few bytes per connection).
python3 "$root/benches/idle_memory/heap_breakdown.py" "$out/stacks" "$n"
