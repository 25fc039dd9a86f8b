//! Logging with `tracing`: human-readable text by default, JSON lines with
//! `log.format = "json"`. Job logs run inside a span carrying `job_id`, `task` and
//! `attempt`, so every line a job writes says which job it belongs to.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides
/// `log.level`. Calling it twice is harmless (the second call does nothing).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
