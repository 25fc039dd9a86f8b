//! A worker with a test handler, for the runtime's integration tests: real broker, real
//! storage, real process (so tests can SIGKILL and SIGTERM it), no video.
//!
//! It consumes the `transcode` queue with [`TestJob`]s, which say how long to work and
//! how to fail, so each runtime behaviour can be provoked on purpose.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::app::{WorkerInfo, worker_main};
use shared::messages::JobMessage;
use shared::storage_key::StorageKey;
use shared::{Handler, JobContext, JobError, TaskOutput};
use uuid::Uuid;

/// A job for the test handler.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestJob {
    pub job_id: Uuid,
    pub source: StorageKey,
    pub output_prefix: StorageKey,
    /// How long the "work" takes.
    #[serde(default)]
    pub work_ms: u64,
    /// Fail transiently while the attempt number is at most this.
    #[serde(default)]
    pub fail_attempts: u32,
    /// Fail permanently.
    #[serde(default)]
    pub permanent: bool,
}

impl JobMessage for TestJob {
    const TASK: &'static str = "transcode";
    fn job_id(&self) -> Uuid {
        self.job_id
    }
    fn source(&self) -> &StorageKey {
        &self.source
    }
    fn output_prefix(&self) -> &StorageKey {
        &self.output_prefix
    }
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

struct TestHandler;

impl Handler for TestHandler {
    type Job = TestJob;
    fn handle(&self, job: &TestJob, ctx: &JobContext) -> Result<TaskOutput, JobError> {
        let started = Instant::now();
        let work = Duration::from_millis(job.work_ms);
        while started.elapsed() < work {
            ctx.check_cancelled()?;
            ctx.progress(100.0 * started.elapsed().as_secs_f64() / work.as_secs_f64());
            std::thread::sleep(Duration::from_millis(20));
        }
        if job.permanent {
            return Err(JobError::Permanent(
                "test handler: permanent failure requested".into(),
            ));
        }
        if ctx.attempt <= job.fail_attempts {
            return Err(JobError::Transient(format!(
                "test handler: failing attempt {}",
                ctx.attempt
            )));
        }
        let source = std::fs::read(&ctx.source_path).map_err(JobError::transient)?;
        let out = ctx.scratch_dir.join("out.txt");
        std::fs::write(&out, &source).map_err(JobError::transient)?;
        let mut output = TaskOutput::default();
        output.push(
            "out.txt",
            out,
            serde_json::json!({ "attempt": ctx.attempt }),
        );
        Ok(output)
    }
}

fn main() -> ExitCode {
    let info = WorkerInfo {
        name: "vidpipe-testworker",
        about: "Test worker for vidpipe's integration tests",
        default_concurrency: 1,
    };
    worker_main(info, |_| Ok(TestHandler))
}
