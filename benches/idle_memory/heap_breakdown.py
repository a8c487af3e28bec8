#!/usr/bin/env python3
"""Groups a heaptrack "leaked" flame-graph stack file (what was still allocated when
examples/idle_memory exited, i.e. the idle state) into the parts of a pooled TLS connection.

    heaptrack -o /tmp/ours target/release/examples/idle_memory 1000
    heaptrack_print -f /tmp/ours.zst -p 0 -a 0 -T 0 --flamegraph-cost-type leaked -F /tmp/ours.stacks
    benches/idle_memory/heap_breakdown.py /tmp/ours.stacks 1000 [--top 20]

Debian ships libssl without symbols, so OpenSSL's internal frames are addresses; the groups
rely on the exported functions and our Rust frames around them. Tickets that OpenSSL
processes inside the handshake (nginx's) count under the handshake groups, not under
"sessions from TLS 1.3 tickets", which are the ones read after it.
"""
import collections
import sys

# First matching rule wins; each is (label, predicate over the frame list).
def has(*names):
    return lambda frames: all(any(n in f for f in frames) for n in names)

RULES = [
    ("our copy of the offered session (openssl_ext::dup_session)", lambda fr: any("dup_session" in f for f in fr) and not any("raw_new_session" in f for f in fr)),
    ("session copies for the cache (new-session callback)", has("raw_new_session")),
    ("read buffer kept after a read (SSL_read with nothing to return)", lambda fr: any("SSL_read" in f for f in fr) and leaf_is_big(fr)),
    ("sessions from TLS 1.3 tickets (read after the handshake)", lambda fr: any("SSL_read" in f for f in fr)),
    ("SSL object (SSL_new)", has("SSL_new")),
    ("cipher contexts (EVP_CipherInit_ex)", has("EVP_CipherInit_ex")),
    ("handshake buffer (init_buf, BUF_MEM_grow)", lambda fr: any("BUF_MEM_grow" in f for f in fr) and any("connect" in f for f in fr)),
    ("peer certificate chain (d2i/X509)", lambda fr: any("connect" in f for f in fr) and any(("X509" in f or "d2i" in f or "ASN1" in f) for f in fr)),
    ("key share / keys (EVP_PKEY)", lambda fr: any("connect" in f for f in fr) and any("EVP_PKEY" in f or "EC_" in f for f in fr)),
    ("other OpenSSL state during the handshake", lambda fr: any("SslStream$LT$S$GT$::connect" in f or "ssl::SslStream" in f and "connect" in f for f in fr)),
    ("SslDigest (strings, cert digest)", has("SslDigest")),
    ("BIO (tokio-openssl stream)", has("BIO_new")),
    ("tokio I/O registration", has("Registration")),
    ("Connection box (stream, lease, timing)", has("Connection::new")),
    ("digest Arc / other connect-path Rust allocations", lambda fr: any("establish" in f or "dial" in f for f in fr)),
    ("pool (idle list, keys)", lambda fr: any("upstream_pool::pool" in f for f in fr)),
    ("example's own Vec / JoinSet", lambda fr: any("idle_memory::run_" in f for f in fr)),
]

big = set()

def leaf_is_big(frames):
    return tuple(frames) in big

def main():
    path, n = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 0
    stacks = []
    for line in open(path):
        stack, _, cost = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        stacks.append((frames, int(cost)))
        # One-site stacks of >= 8 KiB per connection inside SSL_read: the record buffer.
        if int(cost) / n >= 8192:
            big.add(tuple(frames))
    groups = collections.Counter()
    for frames, cost in stacks:
        for label, pred in RULES:
            if pred(frames):
                groups[label] += cost
                break
        else:
            groups["other (one-time: runtime, context, CA store, ...)"] += cost
    total = sum(groups.values())
    print(f"| part | bytes per connection |\n|---|---:|")
    for label, cost in groups.most_common():
        print(f"| {label} | {cost / n:,.0f} |")
    print(f"| **total heap still allocated / {n}** | **{total / n:,.0f}** |")
    if top:
        agg = collections.Counter()
        for frames, cost in stacks:
            agg[";".join(f.split("::h")[0][:50] for f in frames[-10:])] += cost
        for k, v in agg.most_common(top):
            print(f"\n{v / n:,.0f} B/conn: {k}")

main()
