//! The `thumbnailer` worker binary: thin by design. It hands its handler to the shared
//! worker runtime (`shared::app::worker_main`), which owns settings, the consume / ack /
//! retry / dead-letter loop, health, metrics and shutdown.

use std::process::ExitCode;

use shared::app::{WorkerInfo, worker_main};
use thumbnailer::ThumbnailHandler;

fn main() -> ExitCode {
    let info = WorkerInfo {
        name: "thumbnailer",
        about: "vidpipe thumbnailer: consumes video_tasks.thumbnail and makes posters, thumbnails and sprite sheets",
        default_concurrency: 2,
    };
    worker_main(info, ThumbnailHandler::from_settings)
}
