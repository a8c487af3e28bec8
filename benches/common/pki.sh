# Sourced by the benchmark scripts (proxy_vs_nginx.sh, load_vs_h2load.sh,
# idle_memory_vs_bare.sh): the loopback PKI their nginx upstreams serve.

# make_localhost_pki: writes into the current directory a CA (ca.pem, ca.key) and a leaf it
# signed for localhost and 127.0.0.1 (server.pem, server.key), EC P-256 as the tests use,
# valid for two days.
make_localhost_pki() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=Bench Root" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext.cnf -out server.pem 2>/dev/null
}
