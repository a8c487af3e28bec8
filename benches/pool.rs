//! The pool's hit path: `Connector::get` on a peer with an idle pooled connection, then
//! `Connector::release`, with metrics, idle timestamps and caps on (see
//! `benches/common/hit.rs` for the exact setup). One key and 10,000 keys, one task and two
//! threads contending; plaintext TCP to a child process that holds the sockets, so only the
//! pool's cost is measured.
//!
//! ```text
//! cargo bench --bench pool
//! ```
//!
//! The same scenarios side by side with Pingora's pool and connector live in the separate
//! crate `benches/peers` (it needs cmake and minutes of compiling, so it is not part of the
//! default build).

mod common;

use std::time::Duration;

use common::hit::{self, SCENARIOS};
use criterion::Criterion;

fn main() {
    common::child::run_if_child();
    common::raise_nofile_limit();
    common::install_recorder();
    common::print_header("pool");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    for (threads, keys) in SCENARIOS {
        let mut group = c.benchmark_group(hit::group_name(threads, keys));
        hit::bench_ours(&mut group, threads, keys);
        group.finish();
    }
    c.final_summary();
}
