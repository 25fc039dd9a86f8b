//! The `transcoder` worker binary: thin by design. It hands its handler to the shared worker
//! runtime (`shared::app::worker_main`), which owns settings, the consume / ack / retry /
//! dead-letter loop, health, metrics and shutdown.

use std::process::ExitCode;

use shared::app::{WorkerInfo, worker_main};
use transcoder::TranscodeHandler;

fn main() -> ExitCode {
    let info = WorkerInfo {
        name: "transcoder",
        about: "vidpipe transcoder: consumes video_tasks.transcode and turns each upload into an MP4/HLS rendition ladder",
        default_concurrency: 1,
    };
    worker_main(info, TranscodeHandler::from_settings)
}
