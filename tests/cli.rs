//! End-to-end tests of the `upstream-pool` binary: `bench` against its embedded upstream,
//! `probe` against in-process test servers, and the exit codes of bad input.
//!
//! They run the built binary as a child process, as a user would, so they check output
//! formats and exit codes rather than internals.

// The binary only exists with the `cli` feature.
#![cfg(feature = "cli")]

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use support::certs::{Identity, TestPki};
use support::server::TestServer;
use support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_upstream-pool");

/// Generous: a 2-second bench on a loaded 2-core machine, plus start-up.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the binary with `args` to completion.
async fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the upstream-pool binary");
    tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("upstream-pool {args:?} did not finish in {RUN_TIMEOUT:?}"))
        .expect("wait for upstream-pool")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: unexpected exit status\n--- stdout\n{}\n--- stderr\n{}",
        stdout(out),
        stderr(out)
    );
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e})\n--- stdout\n{}\n--- stderr\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `cert` as PEM to `dir/name` and returns the path as a string argument.
fn write_cert(dir: &TempDir, name: &str, cert: &Identity) -> String {
    let path = dir.join(name);
    std::fs::write(&path, cert.cert_pem()).expect("write PEM");
    arg(&path)
}

fn arg(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_string()
}

/// Errors are one line on stderr, naming what went wrong.
fn assert_one_line_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got:\n{err}"
    );
    assert!(err.starts_with("error: "), "no error prefix: {err}");
    assert!(err.contains(needle), "{needle:?} missing from: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_reuse_reuses_almost_every_connection() {
    let out = run(&["bench", "--duration", "2", "--json"]).await;
    assert_code(&out, 0, "bench --json");
    let v = json(&out);
    assert_eq!(v["embedded"], true);
    assert_eq!(v["reuse"], true);
    assert!(v["requests"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let ratio = v["reuse_ratio"].as_f64().unwrap();
    assert!(ratio > 0.9, "reuse ratio {ratio}: {v}");
    assert_eq!(v["statuses"]["200"], v["requests"]);
    assert_eq!(v["protocol"], "HTTP/1.1", "{v}");
    assert_eq!(
        v["streams_per_connection"]["max"].as_f64(),
        Some(1.0),
        "{v}"
    );
    let seen = &v["embedded_server"];
    assert_eq!(seen["connections"], v["connections_opened"], "{v}");
    assert_eq!(seen["max_streams_per_connection"], 1, "{v}");
    let opened = v["connections_opened"].as_u64().unwrap();
    assert!(
        (1..=16).contains(&opened),
        "{opened} connections for concurrency 16: {v}"
    );
    assert!(v["requests_per_sec"].as_f64().unwrap() > 0.0);
    let lat = &v["latency_us"];
    assert!(
        lat["p50"].as_u64().unwrap() <= lat["p99"].as_u64().unwrap(),
        "{v}"
    );
    assert!(
        lat["p99"].as_u64().unwrap() <= lat["max"].as_u64().unwrap(),
        "{v}"
    );
    assert!(
        v["tls"]["version"].as_str().unwrap().starts_with("TLSv1."),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_without_reuse_opens_a_connection_per_request_and_resumes() {
    let out = run(&["bench", "--duration", "2", "--reuse", "off", "--json"]).await;
    assert_code(&out, 0, "bench --reuse off --json");
    let v = json(&out);
    assert_eq!(v["reuse"], false);
    assert_eq!(v["reuse_ratio"].as_f64(), Some(0.0), "{v}");
    assert_eq!(v["reused_checkouts"], 0, "{v}");
    assert!(v["requests"].as_u64().unwrap() > 10, "{v}");
    // One per connection the server accepted (the preflight connection is not part of the
    // run) and one per checkout, give or take the dials in flight at the deadline (at most
    // one per worker): the client counts a handshake when it completes on its side, the
    // server a moment later.
    let opened = v["connections_opened"].as_u64().unwrap();
    let accepted = v["embedded_server"]["connections"].as_u64().unwrap();
    assert!(
        (accepted..=accepted + 16).contains(&opened),
        "{opened} connections opened, the server accepted {accepted}: {v}"
    );
    let checkouts = v["checkouts"].as_u64().unwrap();
    assert!(
        (checkouts..=checkouts + 16).contains(&opened),
        "{opened} connections opened for {checkouts} checkouts: {v}"
    );
    assert_eq!(v["protocol"], "HTTP/1.1", "{v}");
    // Resumption still applies to the fresh connections.
    let hs = &v["handshakes"];
    assert!(
        hs["resumed"].as_u64().unwrap() > hs["full"].as_u64().unwrap(),
        "expected mostly resumed handshakes: {v}"
    );
    assert!(hs["resumed_mean_us"].as_f64().unwrap() > 0.0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_resume_off_does_only_full_handshakes() {
    let out = run(&[
        "bench",
        "--requests",
        "60",
        "--reuse",
        "off",
        "--resume",
        "off",
        "-c",
        "4",
        // One thread: client and embedded upstream share a current-thread runtime.
        "--threads",
        "1",
        "--json",
    ])
    .await;
    assert_code(&out, 0, "bench --resume off --threads 1");
    let v = json(&out);
    assert_eq!(v["requests"], 60, "{v}");
    assert_eq!(v["handshakes"]["resumed"], 0, "{v}");
    assert_eq!(v["handshakes"]["full"], 60, "{v}");
    assert_eq!(v["handshakes"]["resumed_mean_us"], Value::Null, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_preconnect_warms_the_pool_before_the_clock_and_reports_peer_stats() {
    let pki = TestPki::shared();
    let server = TestServer::builder().start();
    let dir = TempDir::new("cli-preconnect").unwrap();
    let ca = write_cert(&dir, "root-a.pem", &pki.root_a);
    let target = server.addr().to_string();
    let out = run(&[
        "bench",
        "--target",
        &target,
        "--sni",
        "localhost",
        "--ca",
        &ca,
        "--preconnect",
        "8",
        "-c",
        "4",
        "--requests",
        "200",
        "--json",
    ])
    .await;
    assert_code(&out, 0, "bench --preconnect 8 --json");
    let v = json(&out);
    assert_eq!(v["requests"], 200, "{v}");
    assert_eq!(v["preconnect"]["idle"], 8, "{v}");
    let before = v["preconnect"]["handshakes_full"].as_u64().unwrap()
        + v["preconnect"]["handshakes_resumed"].as_u64().unwrap();
    assert_eq!(before, 8, "{v}");
    // Every request went on a preconnected connection: no handshake during the run.
    assert_eq!(v["connections_opened"], 0, "{v}");
    assert_eq!(v["handshakes"]["full"], 0, "{v}");
    assert_eq!(v["handshakes"]["resumed"], 0, "{v}");
    // The server saw the preflight connection and the eight preconnected ones, no more.
    let stats = server.wait_for(|s| s.requests >= 200).await;
    assert_eq!(stats.accepted, 9, "{stats:#?}");
    assert_eq!(stats.requests, 200);

    let peers = v["peer_stats"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{v}");
    let p = &peers[0];
    assert!(p["peer"].as_str().unwrap().contains(&target), "{v}");
    assert_eq!(p["checkouts_reused"], 200, "{v}");
    assert_eq!(p["checkouts_new"], 0, "{v}");
    assert_eq!(p["idle"], 8, "{v}");
    assert_eq!(p["in_use"], 0, "{v}");
    assert_eq!(p["connect_errors"], 0, "{v}");

    let out = run(&[
        "bench",
        "--target",
        &target,
        "--sni",
        "localhost",
        "--ca",
        &ca,
        "--preconnect",
        "2",
        "-c",
        "1",
        "--requests",
        "5",
    ])
    .await;
    assert_code(&out, 0, "bench --preconnect 2");
    let text = stdout(&out);
    assert!(
        text.contains("preconnect   2 idle before the clock"),
        "preconnect line missing from:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_text_summary_stops_after_requests() {
    let out = run(&["bench", "--requests", "300", "--concurrency", "4"]).await;
    assert_code(&out, 0, "bench --requests");
    let text = stdout(&out);
    for needle in [
        "300 ok, 0 failed",
        "req/s",
        "p50",
        "p99",
        "reuse ratio",
        "handshakes",
        "errors       none",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // Not a terminal: no progress bar on stderr.
    assert_eq!(stderr(&out), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compare_reports_three_runs_and_ratios() {
    let out = run(&["bench", "--compare", "--duration", "500ms", "--json"]).await;
    assert_code(&out, 0, "bench --compare --json");
    let v = json(&out);
    let runs = v["runs"].as_array().expect("runs array");
    let modes: Vec<(bool, bool)> = runs
        .iter()
        .map(|r| {
            (
                r["reuse"].as_bool().unwrap(),
                r["resume"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(modes, [(true, true), (false, true), (false, false)]);
    let reuse = v["ratios"]["reuse_requests_per_sec"]
        .as_f64()
        .expect("ratio");
    assert!(
        reuse > 1.0,
        "pooling should beat a connection per request: {v}"
    );
    assert!(
        v["ratios"]["resume_requests_per_sec"].as_f64().is_some(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serves_prometheus_metrics_while_running() {
    // Find a free port below the ephemeral range (32768+), so the connections the bench
    // itself opens cannot take it between this check and the child's bind.
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    let port = (start..32_000)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 32000");
    let addr = format!("127.0.0.1:{port}");
    let child = tokio::spawn({
        let addr = addr.clone();
        async move {
            run(&[
                "bench",
                "--duration",
                "3",
                "--json",
                "--metrics-addr",
                &addr,
            ])
            .await
        }
    });
    let mut scraped = String::new();
    // Scrape until the metrics show up or the bench ends (it runs 3 s; slower under load).
    while !child.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        scraped.clear();
        s.read_to_string(&mut scraped).await.unwrap();
        if scraped.contains("upstream_pool_checkouts_total") {
            break;
        }
    }
    let out = child.await.unwrap();
    assert_code(&out, 0, "bench --metrics-addr");
    for name in [
        "upstream_pool_checkouts_total",
        "upstream_tls_handshake_duration_seconds",
        "upstream_tls_handshakes_total",
    ] {
        assert!(
            scraped.contains(name),
            "{name} missing from the exposition:\n{scraped}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_the_negotiated_parameters_and_certificate() {
    let pki = TestPki::shared();
    let server = TestServer::builder().start();
    let dir = TempDir::new("cli-probe").unwrap();
    let ca = write_cert(&dir, "root-a.pem", &pki.root_a);
    let target = server.addr().to_string();

    let out = run(&["probe", &target, "--sni", "localhost", "--ca", &ca]).await;
    assert_code(&out, 0, "probe");
    let text = stdout(&out);
    let sha256 = hex(&pki.server.sha256());
    assert!(
        text.contains(&sha256),
        "SHA-256 {sha256} missing from:\n{text}"
    );
    assert!(
        text.contains(&pki.server.serial_hex()),
        "serial missing from:\n{text}"
    );
    for needle in [
        "TLSv1.3",
        "CN=localhost",
        "CN=Test Intermediate A",
        "resumed",
        "not after",
        "tcp connect",
        "tls handshake",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }

    let out = run(&[
        "probe",
        &target,
        "--sni",
        "localhost",
        "--ca",
        &ca,
        "--json",
    ])
    .await;
    assert_code(&out, 0, "probe --json");
    let v = json(&out);
    assert_eq!(v["tls"]["certificate"]["sha256"], sha256.as_str(), "{v}");
    assert_eq!(v["tls"]["resumed"], false);
    assert_eq!(v["sni"], "localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_defaults_the_sni_to_the_host_name() {
    let pki = TestPki::shared();
    let server = TestServer::builder().start();
    let dir = TempDir::new("cli-probe").unwrap();
    let ca = write_cert(&dir, "root-a.pem", &pki.root_a);
    // `localhost` may resolve to ::1 first; the server only listens on 127.0.0.1, so this
    // also checks that probe moves on to the next address.
    let target = format!("localhost:{}", server.addr().port());
    let out = run(&["probe", &target, "--ca", &ca, "--json"]).await;
    assert_code(&out, 0, "probe localhost");
    assert_eq!(json(&out)["sni"], "localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_rejects_an_untrusted_certificate() {
    let pki = TestPki::shared();
    let server = TestServer::builder().identity(&pki.server_b).start();
    let dir = TempDir::new("cli-probe").unwrap();
    let ca = write_cert(&dir, "root-a.pem", &pki.root_a);
    let out = run(&[
        "probe",
        &server.addr().to_string(),
        "--sni",
        "localhost",
        "--ca",
        &ca,
    ])
    .await;
    assert_code(&out, 1, "probe untrusted");
    assert_one_line_error(&out, "invalid_cert");
    assert_eq!(stdout(&out), "");

    // The same server passes with --insecure.
    let out = run(&[
        "probe",
        &server.addr().to_string(),
        "--sni",
        "localhost",
        "--insecure",
    ])
    .await;
    assert_code(&out, 0, "probe --insecure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_names_a_hostname_mismatch() {
    let pki = TestPki::shared();
    let server = TestServer::builder().identity(&pki.other_host).start();
    let dir = TempDir::new("cli-probe").unwrap();
    let ca = write_cert(&dir, "root-a.pem", &pki.root_a);
    let out = run(&[
        "probe",
        &server.addr().to_string(),
        "--sni",
        "localhost",
        "--ca",
        &ca,
    ])
    .await;
    assert_code(&out, 1, "probe wrong host");
    assert_one_line_error(&out, "invalid_cert");
    assert_one_line_error(&out, "hostname mismatch");
}

#[tokio::test]
async fn probe_reports_a_refused_connection() {
    // Bind and drop to get a port with nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(&["probe", &format!("127.0.0.1:{port}")]).await;
    assert_code(&out, 1, "probe refused");
    assert_one_line_error(&out, "connect_refused");
}

#[tokio::test]
async fn bad_flags_exit_2_with_a_message() {
    let cases: &[&[&str]] = &[
        &["bench", "--no-such-flag"],
        &["bench", "--concurrency", "0"],
        &["bench", "--threads", "0"],
        &["bench", "--duration", "5x"],
        &["bench", "--reuse", "maybe"],
        &["bench", "--compare", "--reuse", "off"],
        &["bench", "--alpn", "h3"],
        &["bench", "--metrics-addr", "not-an-address"],
        &["bench", "--target", "no-port"],
        &["bench", "--cert", "c.pem"],
        &["probe"],
        &["probe", "127.0.0.1:0"],
        &["nonsense"],
    ];
    for args in cases {
        let out = run(args).await;
        assert_code(&out, 2, &format!("{args:?}"));
        let err = stderr(&out);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn tls_flags_without_target_are_refused() {
    let out = run(&["bench", "--insecure"]).await;
    assert_code(&out, 2, "bench --insecure without --target");
    assert_one_line_error(&out, "--target");
}

#[tokio::test]
async fn unreadable_or_unusable_pem_exits_2_with_one_line() {
    let dir = TempDir::new("cli-pem").unwrap();
    let missing: PathBuf = dir.join("missing.pem");
    let missing = arg(&missing);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = arg(&garbage);
    let pki = TestPki::shared();
    let cert = write_cert(&dir, "client.pem", &pki.client_a);
    let wrong_key = dir.join("wrong.key");
    std::fs::write(&wrong_key, pki.client_b.key_pem()).unwrap();
    let wrong_key = arg(&wrong_key);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["probe", "127.0.0.1:9", "--ca", &missing], "--ca"),
        (
            vec!["bench", "--target", "127.0.0.1:9", "--ca", &missing],
            "--ca",
        ),
        (
            vec!["probe", "127.0.0.1:9", "--ca", &garbage],
            "no PEM certificate",
        ),
        (
            vec![
                "probe",
                "127.0.0.1:9",
                "--cert",
                &missing,
                "--key",
                &missing,
            ],
            "--cert",
        ),
        (
            vec!["probe", "127.0.0.1:9", "--cert", &cert, "--key", &garbage],
            "--key",
        ),
        (
            vec!["probe", "127.0.0.1:9", "--cert", &cert, "--key", &wrong_key],
            "does not match",
        ),
    ];
    for (args, needle) in cases {
        let out = run(&args).await;
        assert_code(&out, 2, &format!("{args:?}"));
        assert_one_line_error(&out, needle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_http2_multiplexes_the_workers_over_one_connection() {
    let out = run(&[
        "bench",
        "--alpn",
        "h2",
        "-c",
        "64",
        "--duration",
        "2",
        "--json",
    ])
    .await;
    assert_code(&out, 0, "bench --alpn h2 -c 64");
    let v = json(&out);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["protocol"], "HTTP/2", "{v}");
    assert!(v["requests"].as_u64().unwrap() > 100, "{v}");
    let seen = &v["embedded_server"];
    // The server's view: every connection it accepted spoke HTTP/2, and the 64 workers'
    // requests overlapped on one connection (its stream limit, 128, leaves room for all).
    assert_eq!(seen["connections"], v["connections_opened"], "{v}");
    assert_eq!(seen["h2_connections"], seen["connections"], "{v}");
    let opened = v["connections_opened"].as_u64().unwrap();
    assert!(
        (1..=4).contains(&opened),
        "{opened} connections for 64 streams: {v}"
    );
    let peak = seen["max_streams_per_connection"].as_u64().unwrap();
    assert!(
        peak > 16,
        "at most {peak} streams in flight on one connection: {v}"
    );
    assert!(
        v["streams_per_connection"]["max"].as_f64().unwrap() > 16.0,
        "{v}"
    );
    assert_eq!(v["tls"]["alpn"], "h2", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_http2_respects_the_servers_stream_limit() {
    let out = run(&[
        "bench",
        "--alpn",
        "h2",
        "-c",
        "32",
        "--embedded-max-streams",
        "8",
        "--requests",
        "2000",
        "--json",
    ])
    .await;
    assert_code(&out, 0, "bench --alpn h2 --embedded-max-streams 8");
    let v = json(&out);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["requests"], 2000, "{v}");
    let seen = &v["embedded_server"];
    let peak = seen["max_streams_per_connection"].as_u64().unwrap();
    assert!(
        peak <= 8,
        "{peak} streams in flight on one connection, limit 8: {v}"
    );
    let opened = v["connections_opened"].as_u64().unwrap();
    assert!(
        (4..=8).contains(&opened),
        "32 streams at 8 per connection took {opened} connections: {v}"
    );
    assert_eq!(seen["connections"], v["connections_opened"], "{v}");
}

#[tokio::test]
async fn bench_refuses_reuse_off_over_http2() {
    let out = run(&["bench", "--alpn", "h2", "--reuse", "off"]).await;
    assert_code(&out, 2, "bench --alpn h2 --reuse off");
    assert_one_line_error(&out, "HTTP/1.1");
}
