//! The `thumbnailer` worker binary: thin by design. It hands its handler to the shared worker
//! runtime (`shared::app::worker_main`), which owns settings, the consume / ack / retry /
//! dead-letter loop, health, metrics and shutdown.
//!
//! This build has no media pipeline yet: the handler parks every job in the dead-letter
//! queue with a reason saying so, so nothing is lost and `producer dead replay` can
//! re-run the jobs once a build with the pipeline is deployed.

use std::process::ExitCode;

use shared::app::{WorkerInfo, worker_main};
use shared::messages::ThumbnailJob;
use shared::{Handler, JobContext, JobError, TaskOutput};

/// Placeholder until the FFmpeg pipeline lands: refuses every job, permanently.
struct PendingPipelineHandler;

impl Handler for PendingPipelineHandler {
    type Job = ThumbnailJob;
    fn handle(&self, _job: &ThumbnailJob, _ctx: &JobContext) -> Result<TaskOutput, JobError> {
        Err(JobError::Permanent(
            "this thumbnailer build has no media pipeline yet; replay the job once one is deployed"
                .into(),
        ))
    }
}

fn main() -> ExitCode {
    let info = WorkerInfo {
        name: "thumbnailer",
        about: "vidpipe thumbnailer: consumes video_tasks.thumbnail and makes posters, thumbnails and sprite sheets",
        default_concurrency: 2,
    };
    worker_main(info, |_| Ok(PendingPipelineHandler))
}
