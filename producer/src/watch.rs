//! `producer watch DIR`: upload every video file that appears in a folder, once it is
//! fully written ([`crate::settle`]), and move it out of the way: to `done/` once stored
//! and published, to `failed/` (with `NAME.reason.txt`) when it is not a video by its
//! extension, the upload check refuses it, or (with `--wait`) one of its tasks ends dead.
//!
//! The folder is polled (no file-notification dependency: a poll works the same on local
//! disks, bind mounts and network shares, where notifications often do not arrive). Files
//! are uploaded one at a time, oldest look first; with `--wait` each upload's jobs are
//! followed in the background ([`crate::wait`]) while the next files upload.
//!
//! Against a hostile dropper: links are never followed (a symbolic link is skipped, a file
//! with several hard links is refused), and the file is opened once and checked to be the
//! very inode that settled before anything is read, then read through that open
//! descriptor, so swapping in a link after the check uploads nothing.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget};
use shared::settings::Settings;
use shared::storage::Storage;

use crate::cli::WatchArgs;
use crate::exit::Failure;
use crate::publisher::Broker;
use crate::settle::{self, Pending, Settling, Version, WatchState};
use crate::upload::{self, JobOptions, JobPlan};
use crate::wait;

/// Where a handled file goes.
const DONE: &str = "done";
const FAILED: &str = "failed";

/// Everything one watcher shares between files.
struct Watcher {
    dir: PathBuf,
    options: JobOptions,
    storage: Storage,
    broker: Arc<Broker>,
    state: WatchState,
    follow: bool,
    multi: MultiProgress,
    interactive: bool,
}

/// How one ready file ended.
enum Handled {
    /// Stored and published, moved to `done/`.
    Uploaded,
    /// Moved to `failed/` with the reason.
    Refused,
    /// It changed while being uploaded: nothing published, it settles again.
    Changed,
}

/// `producer watch`: runs until Ctrl-C or SIGTERM (exit 0), between files.
pub async fn run(settings: &Settings, args: WatchArgs) -> Result<(), Failure> {
    let options = JobOptions::from_args(&args.job)?;
    let dir = args.dir.clone();
    if !std::fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Err(Failure::usage(format!("{}: not a folder", dir.display())));
    }
    for sub in [DONE, FAILED] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| {
            Failure::Infra(anyhow::anyhow!("creating {sub}/ in {}: {e}", dir.display()))
        })?;
    }
    let state = WatchState::load(&dir).map_err(Failure::Infra)?;
    let storage = Storage::from_settings(&settings.storage)
        .map_err(|e| Failure::Infra(e.context("opening storage (settings `storage.*`)")))?;
    let broker = Arc::new(Broker::connect(settings).await?);
    let interactive = std::io::stderr().is_terminal();
    let mut watcher = Watcher {
        dir,
        options,
        storage,
        broker,
        state,
        follow: args.wait,
        multi: MultiProgress::with_draw_target(if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        }),
        interactive,
    };
    let settle = Duration::from_secs_f64(args.settle);
    eprintln!(
        "producer: watching {} (settle {settle:?}); uploaded files move to {DONE}/, refused ones to {FAILED}/",
        watcher.dir.display()
    );
    let mut stop = std::pin::pin!(wait::interrupted());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.poll));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settling = Settling::default();
    loop {
        tokio::select! {
            signal = &mut stop => {
                eprintln!("producer: watch stopped by {signal}");
                return Ok(());
            }
            _ = tick.tick() => watcher.look(&mut settling, settle).await?,
        }
    }
}

impl Watcher {
    /// One look at the folder: handles every file that has settled.
    async fn look(&mut self, settling: &mut Settling, settle: Duration) -> Result<(), Failure> {
        let found = settle::scan(&self.dir)
            .map_err(|e| Failure::Infra(anyhow::anyhow!("reading {}: {e}", self.dir.display())))?;
        for name in settling.look(&found, Instant::now(), settle) {
            let version = found[&name];
            match self.handle(&name, version).await? {
                Handled::Changed => settling.forget(&name),
                Handled::Uploaded | Handled::Refused => {}
            }
        }
        Ok(())
    }

    /// Refuses, or uploads and publishes, one settled file.
    async fn handle(&mut self, name: &str, version: Version) -> Result<Handled, Failure> {
        let path = self.dir.join(name);
        if !settle::is_video_name(name) {
            return self.refuse(
                name,
                "not a video file by its extension (see `producer watch --help`)",
            );
        }
        if version.nlink > 1 {
            return self.refuse(
                name,
                "has more than one hard link; copy the file in instead",
            );
        }
        // Opened once, checked to be the inode that settled, read through this descriptor.
        let opened = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => return self.refuse(name, &format!("cannot open it ({e})")),
        };
        let same = opened.metadata().is_ok_and(|m| Version::of(&m) == version);
        if !same {
            return Ok(Handled::Changed);
        }
        let via_fd = fd_path(&opened).unwrap_or_else(|| path.clone());
        if let Err(reason) = upload::check_file(&via_fd) {
            let reason = reason.replace(&via_fd.display().to_string(), "the file");
            return self.refuse(name, &reason);
        }
        self.upload(name, version, &via_fd, &opened).await
    }

    /// Stores and publishes a checked file under the job id the state file gives it,
    /// then moves it to `done/`.
    async fn upload(
        &mut self,
        name: &str,
        version: Version,
        read_from: &Path,
        opened: &std::fs::File,
    ) -> Result<Handled, Failure> {
        let job_id = self.state.job_id_for(name, &version);
        let pending = Pending {
            job_id,
            size: version.size,
            mtime_ns: version.mtime_ns,
        };
        self.state
            .set(name, Some(pending))
            .map_err(Failure::Infra)?;
        let shown = Path::new(name);
        // Names come from whoever writes into the folder: printed only made printable.
        let printable = upload::source_name(shown);
        let plan = JobPlan::new(job_id, &upload::extension(shown), &self.options).named(shown);
        let bar = self.multi.add(ProgressBar::new(version.size));
        bar.set_prefix(upload::source_name(shown));
        let stored = self
            .storage
            .put_file(&plan.source, read_from, &|n| bar.set_position(n))
            .await;
        bar.finish_and_clear();
        stored.map_err(|e| Failure::Infra(e.context(format!("storing {printable}"))))?;
        if !opened.metadata().is_ok_and(|m| Version::of(&m) == version) {
            eprintln!(
                "producer: {printable} changed while it was uploaded; it will go again once it settles"
            );
            return Ok(Handled::Changed);
        }
        let follower = if self.follow {
            Some(
                wait::Follower::start(&self.broker, &[job_id])
                    .await
                    .map_err(Failure::Infra)?,
            )
        } else {
            None
        };
        self.broker
            .publish_all(&plan.messages(&self.broker.topology))
            .await
            .map_err(|e| {
                Failure::Infra(e.context(format!("publishing the jobs of {printable}")))
            })?;
        let done = self.move_to(name, DONE).map_err(Failure::Infra)?;
        self.state.set(name, None).map_err(Failure::Infra)?;
        crate::say!("{job_id}\t{printable}");
        eprintln!(
            "producer: {printable} stored as {}; jobs published: {}",
            plan.source,
            plan.tasks().join(", ")
        );
        if let Some(follower) = follower {
            self.follow_in_background(follower, &plan, done);
        }
        Ok(Handled::Uploaded)
    }

    /// `--wait`: follows the jobs of one upload while the watcher goes on; a dead task
    /// moves the file from `done/` to `failed/` with the reason.
    fn follow_in_background(&self, follower: wait::Follower, plan: &JobPlan, done: PathBuf) {
        let job = wait::TrackedJob {
            job_id: plan.job_id,
            file: done.clone(),
            tasks: plan.tasks().iter().map(|t| t.to_string()).collect(),
        };
        let (storage, multi, interactive) =
            (self.storage.clone(), self.multi.clone(), self.interactive);
        let failed_dir = self.dir.join(FAILED);
        let job_id = plan.job_id;
        tokio::spawn(async move {
            let never = std::future::pending::<&'static str>();
            let ended = follower
                .wait(&[job], &storage, None, &multi, false, interactive, never)
                .await;
            if let Err(Failure::JobsFailed(_)) = ended {
                let reason = format!(
                    "a task of job {job_id} ended dead; `producer dead show {job_id}` says why, \
                     `producer dead replay {job_id}` runs it again once the cause is fixed"
                );
                let name = done.file_name().map(PathBuf::from).unwrap_or_default();
                match move_into(&done, &failed_dir, &name) {
                    Ok(to) => write_reason(&to, &reason),
                    Err(e) => eprintln!("producer: moving {} to {FAILED}/: {e}", done.display()),
                }
            }
        });
    }

    /// Moves a refused file to `failed/` with the reason beside it.
    fn refuse(&mut self, name: &str, reason: &str) -> Result<Handled, Failure> {
        let to = self.move_to(name, FAILED).map_err(Failure::Infra)?;
        write_reason(&to, reason);
        eprintln!(
            "producer: {} refused: {reason}; moved to {FAILED}/",
            upload::source_name(Path::new(name))
        );
        Ok(Handled::Refused)
    }

    /// Moves `name` into the subfolder `sub`, never over an existing file there.
    fn move_to(&self, name: &str, sub: &str) -> anyhow::Result<PathBuf> {
        move_into(&self.dir.join(name), &self.dir.join(sub), Path::new(name)).map_err(|e| {
            let printable = upload::source_name(Path::new(name));
            anyhow::anyhow!("moving {printable} to {sub}/: {e}")
        })
    }
}

/// Renames `from` into `dir` as `name`, or as `name.1`, `name.2`, … when taken.
fn move_into(from: &Path, dir: &Path, name: &Path) -> std::io::Result<PathBuf> {
    let mut to = dir.join(name);
    let mut n = 0;
    while std::fs::symlink_metadata(&to).is_ok() {
        n += 1;
        to = dir.join(format!("{}.{n}", name.display()));
    }
    std::fs::rename(from, &to)?;
    Ok(to)
}

/// Writes `FILE.reason.txt` beside a failed file (best effort: the move is what counts).
fn write_reason(file: &Path, reason: &str) {
    let mut path = file.as_os_str().to_owned();
    path.push(".reason.txt");
    if let Err(e) = std::fs::write(&path, format!("{reason}\n")) {
        eprintln!("producer: writing {}: {e}", Path::new(&path).display());
    }
}

/// `/proc/self/fd/N` of an open file: opening it opens the same inode, whatever the
/// path now names. `None` where there is no `/proc`.
fn fd_path(file: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd as _;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    path.exists().then_some(path)
}
