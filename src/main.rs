//! The `upstream-pool` command line: `bench` and `probe`.

fn main() {
    eprintln!("upstream-pool: the CLI is not built yet");
    std::process::exit(2);
}
