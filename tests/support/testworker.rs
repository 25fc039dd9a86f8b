//! A worker with a test handler, for the runtime's integration tests: real broker, real
//! storage, real process (so tests can SIGKILL and SIGTERM it), no video.
//!
//! It consumes the `transcode` queue with [`TestJob`]s, which say how long to work and
//! how to fail, so each runtime behaviour can be provoked on purpose. With
//! `VIDPIPE_TESTWORKER_TASK=copy` it consumes the tests' own kind instead ([`kind::COPY`],
//! not a builtin kind): the proof that a worker kind is a crate plus one registration.
//! A job with `probe` opens its source through `shared::media` as its kind's registry
//! entry says: `copy` needs no video, `transcode` does.

#[path = "kind.rs"]
mod kind;

use std::marker::PhantomData;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::app::{WorkerInfo, worker_main};
use shared::media;
use shared::messages::JobMessage;
use shared::storage_key::StorageKey;
use shared::tasks::{self, TaskKind};
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
    /// Open the source through the media layer as the job's kind needs it (its registry
    /// entry's `needs_video`, nothing else), and put what it found in the summary.
    #[serde(default)]
    pub probe: bool,
}

impl JobMessage for TestJob {
    const KIND: TaskKind = tasks::TRANSCODE;
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

/// The same job as a job of the tests' own kind: its one registration is `KIND`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CopyJob(TestJob);

impl JobMessage for CopyJob {
    const KIND: TaskKind = kind::COPY;
    fn job_id(&self) -> Uuid {
        self.0.job_id
    }
    fn source(&self) -> &StorageKey {
        &self.0.source
    }
    fn output_prefix(&self) -> &StorageKey {
        &self.0.output_prefix
    }
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

impl AsRef<TestJob> for TestJob {
    fn as_ref(&self) -> &TestJob {
        self
    }
}

impl AsRef<TestJob> for CopyJob {
    fn as_ref(&self) -> &TestJob {
        &self.0
    }
}

/// The test handler for jobs of type `J` (`fn() -> J`: a marker that is `Send + Sync`).
struct TestHandler<J>(PhantomData<fn() -> J>);

impl<J: JobMessage + AsRef<TestJob>> Handler for TestHandler<J> {
    type Job = J;
    fn handle(&self, job: &J, ctx: &JobContext) -> Result<TaskOutput, JobError> {
        let job = job.as_ref();
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
        let mut output = TaskOutput::default();
        if job.probe {
            let needs = media::Needs::of(&J::KIND);
            let streams =
                media::open_streams(&ctx.source_path, &media::MediaLimits::default(), needs)?;
            output.summary = serde_json::json!({ "streams": streams.info });
        }
        let source = std::fs::read(&ctx.source_path).map_err(JobError::transient)?;
        let out = ctx
            .scratch_dir()
            .map_err(JobError::transient)?
            .join("out.txt");
        std::fs::write(&out, &source).map_err(JobError::transient)?;
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
    match std::env::var("VIDPIPE_TESTWORKER_TASK").as_deref() {
        Ok(name) if name == kind::COPY.name => {
            worker_main(info, |_| Ok(TestHandler::<CopyJob>(PhantomData)))
        }
        _ => worker_main(info, |_| Ok(TestHandler::<TestJob>(PhantomData))),
    }
}
