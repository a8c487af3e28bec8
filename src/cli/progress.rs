//! The progress bar on stderr while a bench run is going: only for a person watching a
//! terminal, never in `--json` output or when stderr is a pipe or file.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Redraws per second: smooth enough to watch, cheap enough not to show in the numbers.
const TICK: Duration = Duration::from_millis(100);

/// What the bar measures progress against.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// Time: the run ends after this long.
    Time(Duration),
    /// Requests: the run ends after this many.
    Requests(u64),
}

/// A running progress bar; [`Progress::finish`] removes it.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: ProgressBar,
    ticker: JoinHandle<()>,
}

impl Progress {
    /// Starts a bar labelled `label` that polls `completed` (requests done so far), or
    /// returns `None` when there is no terminal to draw on or `quiet` is set.
    pub(crate) fn start(
        label: String,
        goal: Goal,
        completed: Arc<AtomicU64>,
        quiet: bool,
    ) -> Option<Progress> {
        if quiet || !std::io::stderr().is_terminal() {
            return None;
        }
        let len = match goal {
            Goal::Time(d) => d.as_millis() as u64,
            Goal::Requests(n) => n,
        };
        // `wide_msg` takes what is left of the line and truncates, so a narrow terminal never
        // wraps the bar onto a second line.
        let template = "{prefix} [{bar:20}] {wide_msg}";
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(label);
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                let start = Instant::now();
                let mut interval = tokio::time::interval(TICK);
                loop {
                    interval.tick().await;
                    let done = completed.load(Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64();
                    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
                    bar.set_message(format!("{secs:.1} s, {done} requests, {rate:.0} req/s"));
                    bar.set_position(match goal {
                        Goal::Time(_) => start.elapsed().as_millis() as u64,
                        Goal::Requests(_) => done,
                    });
                }
            }
        });
        Some(Progress { bar, ticker })
    }

    /// Stops updating and erases the bar, so the summary starts on a clean line.
    pub(crate) fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
