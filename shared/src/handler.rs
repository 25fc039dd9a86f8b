//! The one trait both workers implement, and what a handler gets to work with.
//!
//! A handler is synchronous on purpose: the runtime calls it on a blocking thread so a
//! codec loop can never stall heartbeats, acks or other jobs. It reads its input from a
//! local path, writes outputs into its scratch directory and returns them; the runtime
//! commits them to storage atomically and writes the task's `manifest.json` last.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::manifest::Manifest;
use crate::messages::JobMessage;
use crate::outcome::{Cancelled, JobError};
use crate::split::FollowUp;

/// A worker's job logic. See the module docs for the contract.
pub trait Handler: Send + Sync + 'static {
    type Job: JobMessage;
    /// Does the work. Must check `ctx.check_cancelled()` often (at least once a second of
    /// work) and return [`JobError::Cancelled`] when asked. Implementations do their work
    /// in `anyhow` (context at each step, [`crate::permanent`] marks) and convert once
    /// here with [`JobError::classify`].
    fn handle(&self, job: &Self::Job, ctx: &JobContext) -> Result<TaskOutput, JobError>;
}

/// One file a handler produced.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// Name under the job's output prefix, e.g. `720p.mp4` or `hls/720p/seg_00001.ts`.
    pub name: String,
    /// Where the handler wrote it (inside its scratch directory).
    pub path: PathBuf,
    /// Facts for the manifest (resolution, bitrate, time, …): the fields of a JSON object,
    /// stored beside the name, key and size the runtime records (a fact with one of those
    /// names is dropped). See [`crate::manifest::ManifestOutput`].
    pub meta: serde_json::Value,
}

/// What a successful handler returns.
#[derive(Debug, Clone, Default)]
pub struct TaskOutput {
    pub files: Vec<OutputFile>,
    /// Task-level facts for the manifest's `summary` (source probe, durations, …).
    pub summary: serde_json::Value,
    /// Jobs to publish instead of committing anything: a split job's parts (see
    /// [`crate::split`]). When not empty, `files` and `summary` are ignored.
    pub fan_out: Vec<FollowUp>,
}

impl TaskOutput {
    /// Adds a file with its manifest facts.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        meta: impl Serialize,
    ) {
        self.files.push(OutputFile {
            name: name.into(),
            path: path.into(),
            meta: serde_json::to_value(meta).unwrap_or(serde_json::Value::Null),
        });
    }
}

/// One committed part a join reads: its manifest, and a local path for each of its
/// outputs (in the manifest's order).
#[derive(Debug, Clone)]
pub struct CommittedPart {
    pub manifest: Manifest,
    pub files: Vec<PathBuf>,
}

/// Progress sink: percent complete, 0-100.
pub type ProgressFn = Arc<dyn Fn(f64) + Send + Sync>;

/// What a handler gets besides its job.
#[derive(Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Local path of the source video (empty for a join, which reads `parts`).
    pub source_path: PathBuf,
    /// A join's inputs: the committed parts it joins, in order (empty otherwise).
    pub parts: Vec<CommittedPart>,
    /// Empty directory for outputs; removed by the runtime afterwards.
    pub scratch_dir: PathBuf,
    cancel: CancellationToken,
    progress: ProgressFn,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("source_path", &self.source_path)
            .field("scratch_dir", &self.scratch_dir)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    pub fn new(
        job_id: Uuid,
        attempt: u32,
        source_path: PathBuf,
        scratch_dir: PathBuf,
        cancel: CancellationToken,
        progress: ProgressFn,
    ) -> Self {
        Self {
            job_id,
            attempt,
            source_path,
            parts: Vec::new(),
            scratch_dir,
            cancel,
            progress,
        }
    }

    /// A context for running a handler directly (unit tests, benchmarks): never
    /// cancelled unless `cancel` is, progress ignored.
    pub fn standalone(source_path: &Path, scratch_dir: &Path, cancel: CancellationToken) -> Self {
        Self::new(
            Uuid::nil(),
            1,
            source_path.to_path_buf(),
            scratch_dir.to_path_buf(),
            cancel,
            Arc::new(|_| {}),
        )
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// `Err(Cancelled)` once shutdown or the time limit asked the job to stop; it stays
    /// [`JobError::Cancelled`] through any context added on the way out.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.cancel.is_cancelled() {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }

    /// Reports progress (0-100). Cheap; the runtime rate-limits the events it sends.
    pub fn progress(&self, percent: f64) {
        (self.progress)(percent.clamp(0.0, 100.0));
    }
}
