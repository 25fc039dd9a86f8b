//! The `transcoder` worker binary: thin by design. It hands its handler to the shared worker
//! runtime (`shared::app::worker_main`), which owns settings, the consume / ack / retry /
//! dead-letter loop, health, metrics and shutdown.

use std::process::ExitCode;

use shared::app::{WorkerInfo, worker_main};
use transcoder::TranscodeHandler;

fn main() -> ExitCode {
    quiet_svt_av1();
    let info = WorkerInfo {
        name: "transcoder",
        about: "vidpipe transcoder: consumes video_tasks.transcode and turns each upload into an MP4/HLS/CMAF rendition ladder",
        default_concurrency: 1,
    };
    worker_main(info, TranscodeHandler::from_settings)
}

/// SVT-AV1 prints a dozen `Svt[info]` lines to stderr for every encoder it opens, past
/// the worker's structured logs; `SVT_LOG=1` keeps its errors only (unless the operator
/// set `SVT_LOG` themselves).
#[allow(unsafe_code)]
fn quiet_svt_av1() {
    if std::env::var_os("SVT_LOG").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists that could read
        // or write the environment concurrently.
        unsafe { std::env::set_var("SVT_LOG", "1") };
    }
}
