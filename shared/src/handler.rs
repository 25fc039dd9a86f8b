//! The one trait both workers implement, and what a handler gets to work with.
//!
//! A handler is synchronous on purpose: the runtime calls it on a blocking thread so a
//! codec loop can never stall heartbeats, acks or other jobs. It reads its input from a
//! local path, writes outputs into its scratch directory and returns them; the runtime
//! commits them to storage atomically and writes the task's `manifest.json` last.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use anyhow::Context as _;

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
    /// Where outputs go: see [`Self::scratch_dir`].
    scratch: Arc<Scratch>,
    cancel: CancellationToken,
    progress: ProgressFn,
}

/// Where a job's scratch directory is.
#[derive(Debug, Clone)]
pub enum ScratchDir {
    /// This directory, made already (and removed by whoever made it).
    Ready(PathBuf),
    /// A fresh `job-*` directory in this one, made on the handler's first
    /// [`JobContext::scratch_dir`] and removed by the runtime after the job.
    MakeIn(PathBuf),
}

/// A job's scratch directory, made when first asked for: a job that writes nothing (a
/// split into parts, a probe) makes none. Making and removing one is several file
/// system calls, as many as the rest of a small job's storage work.
#[derive(Debug)]
struct Scratch {
    /// The directory to make one in ([`ScratchDir::MakeIn`]).
    root: Option<PathBuf>,
    /// The directory, once made (or given).
    path: OnceLock<PathBuf>,
    /// A directory made here, until the runtime takes it to remove it.
    made: Mutex<Option<tempfile::TempDir>>,
}

/// How a job's scratch directory's name starts: the runtime removes the ones a crashed
/// worker left by it.
pub(crate) const SCRATCH_PREFIX: &str = "job-";

/// A fresh job scratch directory (`job-*`) in `root`, removed when dropped.
pub(crate) fn new_scratch(root: &Path) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("creating a scratch directory in {}", root.display()))
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("source_path", &self.source_path)
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    pub fn new(
        job_id: Uuid,
        attempt: u32,
        source_path: PathBuf,
        scratch: ScratchDir,
        cancel: CancellationToken,
        progress: ProgressFn,
    ) -> Self {
        let (root, path) = match scratch {
            ScratchDir::Ready(dir) => (None, OnceLock::from(dir)),
            ScratchDir::MakeIn(root) => (Some(root), OnceLock::new()),
        };
        Self {
            job_id,
            attempt,
            source_path,
            parts: Vec::new(),
            scratch: Arc::new(Scratch {
                root,
                path,
                made: Mutex::new(None),
            }),
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
            ScratchDir::Ready(scratch_dir.to_path_buf()),
            cancel,
            Arc::new(|_| {}),
        )
    }

    /// The job's own empty directory for its outputs (and anything else it writes),
    /// removed by the runtime after the job. Made on the first call: the error says so
    /// if it could not be (disk full, permissions), and is transient.
    pub fn scratch_dir(&self) -> anyhow::Result<&Path> {
        if let Some(dir) = self.scratch.path.get() {
            return Ok(dir);
        }
        let mut made = self
            .scratch
            .made
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Another thread of the handler's may have made it while this one waited.
        if let Some(dir) = self.scratch.path.get() {
            return Ok(dir);
        }
        let root = self
            .scratch
            .root
            .as_ref()
            .expect("a context without a ready scratch directory has a root to make one in");
        let dir = new_scratch(root)?;
        let path = self.scratch.path.get_or_init(|| dir.path().to_path_buf());
        *made = Some(dir);
        Ok(path)
    }

    /// The scratch directory this context made, if it made one, for the runtime to
    /// remove once the outputs are committed.
    pub(crate) fn take_scratch(&self) -> Option<tempfile::TempDir> {
        self.scratch
            .made
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn context(scratch: ScratchDir) -> JobContext {
        JobContext::new(
            Uuid::new_v4(),
            1,
            PathBuf::new(),
            scratch,
            CancellationToken::new(),
            Arc::new(|_| {}),
        )
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    /// A job that writes nothing makes no scratch directory; one that does gets one
    /// `job-*` directory however often (and from however many threads) it asks, and the
    /// runtime's take removes it.
    #[test]
    fn the_scratch_directory_is_made_on_first_use_and_only_once() {
        let root = tempfile::tempdir().unwrap();
        let idle = context(ScratchDir::MakeIn(root.path().to_path_buf()));
        assert!(idle.take_scratch().is_none());
        drop(idle);
        assert_eq!(entries(root.path()), 0, "a job that never asked made one");

        let ctx = context(ScratchDir::MakeIn(root.path().to_path_buf()));
        let made: Vec<PathBuf> = std::thread::scope(|s| {
            let asks: Vec<_> = (0..4)
                .map(|_| s.spawn(|| ctx.scratch_dir().unwrap().to_path_buf()))
                .collect();
            asks.into_iter().map(|a| a.join().unwrap()).collect()
        });
        assert!(made.iter().all(|d| d == &made[0]), "{made:?}");
        assert!(made[0].is_dir() && made[0].parent() == Some(root.path()));
        assert!(
            made[0]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(SCRATCH_PREFIX)
        );
        assert_eq!(entries(root.path()), 1);
        std::fs::write(made[0].join("out.txt"), b"x").unwrap();

        drop(ctx.take_scratch());
        assert_eq!(entries(root.path()), 0, "the runtime's take removes it");
    }

    /// A directory that cannot be made is the job's error, saying where, and worth a
    /// retry (a full or unmounted disk can come back).
    #[test]
    fn a_scratch_directory_that_cannot_be_made_is_a_transient_error() {
        let root = tempfile::tempdir().unwrap();
        let not_a_dir = root.path().join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let ctx = context(ScratchDir::MakeIn(not_a_dir.clone()));
        let err = ctx.scratch_dir().unwrap_err();
        let JobError::Transient(reason) = JobError::classify(err) else {
            panic!("a scratch directory that cannot be made is worth a retry");
        };
        assert!(
            reason.contains(&not_a_dir.display().to_string()),
            "{reason}"
        );
    }

    /// A context given a directory (handlers run directly, the S3 path) uses it as is.
    #[test]
    fn a_ready_scratch_directory_is_used_as_given() {
        let root = tempfile::tempdir().unwrap();
        let ctx = context(ScratchDir::Ready(root.path().to_path_buf()));
        assert_eq!(ctx.scratch_dir().unwrap(), root.path());
        assert!(ctx.take_scratch().is_none(), "not this context's to remove");
    }
}
