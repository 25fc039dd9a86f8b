//! The `transcoder` worker binary: thin by design. It hands its handler to the shared worker
//! runtime (`shared::app::worker_main`), which owns settings, the consume / ack / retry /
//! dead-letter loop, health, metrics and shutdown.
//!
//! This build has no media pipeline yet: the handler parks every job in the dead-letter
//! queue with a reason saying so, so nothing is lost and `producer dead replay` can
//! re-run the jobs once a build with the pipeline is deployed.

use std::process::ExitCode;

use shared::app::{WorkerInfo, worker_main};
use shared::messages::TranscodeJob;
use shared::{Handler, JobContext, JobError, TaskOutput};

/// Placeholder until the FFmpeg pipeline lands: refuses every job, permanently.
struct PendingPipelineHandler;

impl Handler for PendingPipelineHandler {
    type Job = TranscodeJob;
    fn handle(&self, _job: &TranscodeJob, _ctx: &JobContext) -> Result<TaskOutput, JobError> {
        Err(JobError::Permanent(
            "this transcoder build has no media pipeline yet; replay the job once one is deployed"
                .into(),
        ))
    }
}

fn main() -> ExitCode {
    let info = WorkerInfo {
        name: "transcoder",
        about: "vidpipe transcoder: consumes video_tasks.transcode and turns each upload into an MP4/HLS rendition ladder",
        default_concurrency: 1,
    };
    worker_main(info, |_| Ok(PendingPipelineHandler))
}
