//! The `upstream-pool` command line: `bench` (load an upstream, embedded or real, and report
//! what pooling, reuse and resumption buy) and `probe` (one connection, what it negotiated).
//! See `upstream-pool --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
