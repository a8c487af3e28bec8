//! The `upstream-pool` command line. Binary-only: none of this is part of the library, which
//! is why it lives under `main.rs` instead of `lib.rs`.
//!
//! Exit codes: 0 success, 1 a runtime failure (connection refused, invalid certificate, no
//! request completed), 2 a usage error (bad flag, unreadable file), 130 a second Ctrl-C.

mod args;
mod bench;
mod embedded_pki;
mod embedded_server;
mod load;
mod observe;
mod probe;
mod progress;
mod report;
mod stats;
mod target;

use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::{Cli, Command};

/// How long to let background tasks (the embedded server, the metrics listener) wind down
/// after the command finished; they hold nothing worth waiting for.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// Why a command failed; decides the exit code.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The user asked for something unusable: exit code 2, like clap's own errors.
    Usage(String),
    /// The command ran and failed: exit code 1.
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(msg) | CliError::Failed(msg) => f.write_str(msg),
        }
    }
}

/// Parses the command line, runs the command and returns the process exit code.
pub(crate) fn main() -> ExitCode {
    // Exits with code 2 and clap's message on a bad flag (0 for --help and --version).
    let cli = Cli::parse();
    // `probe` makes one connection: a second thread would only add wake-ups.
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        Command::Probe(_) => Some(1),
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(n));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Bench(args) => bench::run(args).await,
            Command::Probe(args) => probe::run(args).await,
        }
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Writes the command's output. A closed pipe (`| head`) is not an error worth a message;
/// `println!` would panic on it instead.
fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write output: {e}"))),
    }
}
