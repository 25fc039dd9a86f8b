//! Logging with `tracing`: human-readable text by default, JSON lines with
//! `log.format = "json"`. Job logs run inside a span carrying `job_id`, `task` and
//! `attempt`, so every line a job writes says which job it belongs to.
//!
//! Colours only when stderr is a terminal: a log file or a container's log collector gets
//! plain text. lapin's own ERROR lines about a refused login are left out: the broker
//! module says it once per attempt in our words ([`crate::broker::refusal`]), and lapin's
//! repeat it three times with the raw protocol error. Every other lapin line stays.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides
/// `log.level`. Calling it twice is harmless (the second call does nothing).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match settings.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(QuietLapinRefusals)
        .with(fmt)
        .try_init();
}

/// Drops lapin's events about a refused login (said in our words instead): the refusal
/// itself; "unexpected connection close-ok received on channel 0", lapin tripping over
/// the broker's own close of the refused connection; and "Exponential backoff attempts
/// exhausted", which only means that lapin's own recovery, which we never turn on (see
/// [`crate::broker::try_connect`]), gave up.
struct QuietLapinRefusals;

impl<S: Subscriber> Layer<S> for QuietLapinRefusals {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        if !event.metadata().target().starts_with("lapin") {
            return true;
        }
        let mut seen = LapinNoise(false);
        event.record(&mut seen);
        !seen.0
    }
}

/// Whether any field of a lapin event is one that [`QuietLapinRefusals`] leaves out.
struct LapinNoise(bool);

impl Visit for LapinNoise {
    fn record_debug(&mut self, _: &Field, value: &dyn std::fmt::Debug) {
        if !self.0 {
            let text = format!("{value:?}");
            self.0 = crate::broker::is_refusal(&text)
                || text.contains("unexpected connection close-ok received on channel 0")
                || text.contains("Exponential backoff attempts exhausted");
        }
    }
}
