//! Command-line syntax: the `clap` definitions and the value parsers they need.
//!
//! Everything a user types is checked here or in [`super::tls_flags`]; nothing after that
//! point sees a raw string, so a typo is always a clap error (exit code 2) and never a panic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `upstream-pool`: load and inspect TLS upstreams through the `upstream_pool` connector.
#[derive(Debug, Parser)]
#[command(name = "upstream-pool", version, about, long_about = None)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Send `GET /` requests through `upstream_pool::http` (HTTP/1.1 keep-alive, or HTTP/2
    /// streams with --alpn h2) for a while and summarise latency, reuse, streams per
    /// connection and handshakes. Without --target, an embedded TLS upstream (HTTP/2 and
    /// HTTP/1.1) on 127.0.0.1 is started.
    Bench(BenchArgs),
    /// Open one connection and print what was negotiated (like `openssl s_client`).
    Probe(ProbeArgs),
}

/// Options of `bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Upstream to load, HOST:PORT; without it an embedded upstream is started.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) target: Option<String>,

    /// Requests in flight at once (one task each), 1 to 10,000 (each may hold a connection,
    /// and loopback has about 28,000 ephemeral ports).
    #[arg(long, short = 'c', default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) concurrency: u32,

    /// Tokio worker threads for the client (and the embedded upstream). `1` runs everything
    /// on one thread, as `openssl s_time` does, so serial runs pay no cross-thread wake-ups.
    /// Defaults to the number of CPUs.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) threads: Option<u16>,

    /// How long to run: `10`, `10s`, `500ms`, `2m`. Defaults to 10s, or unlimited when
    /// --requests is given.
    #[arg(long, short = 'd', value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,

    /// Stop after this many requests (whichever of --duration and --requests comes first).
    #[arg(long, short = 'n', value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) requests: Option<u64>,

    /// `on`: return each HTTP/1.1 connection to the pool after its response; `off`: a fresh
    /// connection per request (HTTP/1.1 only: an HTTP/2 connection is shared by design).
    #[arg(long, value_enum, default_value_t = Switch::On, conflicts_with = "compare")]
    pub(crate) reuse: Switch,

    /// `off` turns the connector's TLS session cache off, so every handshake is full.
    #[arg(long, value_enum, default_value_t = Switch::On, conflicts_with = "compare")]
    pub(crate) resume: Switch,

    /// Run reuse on, reuse off, and reuse off with resume off back to back and print
    /// the ratios.
    #[arg(long)]
    pub(crate) compare: bool,

    /// Print one JSON object on stdout instead of the text summary.
    #[arg(long)]
    pub(crate) json: bool,

    /// Warm the pool with this many idle connections (`Connector::preconnect`) before the
    /// clock starts; the summary counts their handshakes apart from the run's. Defaults to 0.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub(crate) preconnect: u32,

    /// SETTINGS_MAX_CONCURRENT_STREAMS the embedded upstream announces on HTTP/2
    /// connections (only without --target). Defaults to 128, so `-c 16` and `-c 64` fit on
    /// one connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) embedded_max_streams: Option<u32>,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9000) while running.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,

    /// TLS settings for --target.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

/// Options of `probe`.
#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    /// Upstream to connect to, HOST:PORT.
    #[arg(value_name = "HOST:PORT")]
    pub(crate) target: String,

    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub(crate) json: bool,

    /// TLS settings.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

/// TLS settings shared by `bench --target` and `probe`.
#[derive(Debug, Args, Default)]
pub(crate) struct TlsArgs {
    /// Server name to send and verify. Defaults to the host of HOST:PORT when it is a name;
    /// for an IP address no SNI is sent and only the chain is verified, not a name (use
    /// --insecure to skip verification).
    #[arg(long, value_name = "NAME")]
    pub(crate) sni: Option<String>,

    /// PEM file of CA certificates to trust instead of the system roots.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,

    /// PEM client certificate chain (leaf first) for mutual TLS; needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,

    /// Application protocols to offer.
    #[arg(long, value_enum)]
    pub(crate) alpn: Option<AlpnArg>,

    /// Do not verify the server certificate (chain or name).
    #[arg(long, short = 'k')]
    pub(crate) insecure: bool,
}

impl TlsArgs {
    /// The flags that only make sense against a real upstream, by name, when given.
    pub(crate) fn target_only_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--sni", self.sni.is_some()),
            ("--ca", self.ca.is_some()),
            ("--cert", self.cert.is_some()),
            ("--key", self.key.is_some()),
            ("--insecure", self.insecure),
        ];
        given
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect()
    }
}

/// `on` / `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Switch {
    /// `true` for `on`.
    pub(crate) fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// `--alpn` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AlpnArg {
    /// Offer `http/1.1`.
    H1,
    /// Offer `h2`.
    H2,
    /// Offer `h2`, then `http/1.1`.
    H2h1,
}

/// Parses `10`, `10s`, `1.5s`, `500ms`, `2m` or `1h` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use e.g. 10, 10s, 500ms or 2m"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?}; use ms, s, m or h"
            ))
        }
    };
    let secs = value * scale;
    // Also rejects NaN, which compares false.
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("duration {text:?} must be greater than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "0", "0ms", "-1", "1x", "1.2.3", "nan", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
