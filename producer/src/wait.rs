//! `upload --wait`: follow `video_events` until every task of every job is completed,
//! dead or cancelled, showing live progress (progress bars on a terminal, plain lines otherwise).
//!
//! The event queue (exclusive, auto-delete, bound to `job.<job_id>.#`) is bound before
//! anything is published, so no event is missed. Events are best effort, so completion is
//! also read from the task manifests (and cancel markers) every few seconds: a lost
//! `completed` or `cancelled` event never leaves `--wait` hanging.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lapin::{Channel, Consumer};
use serde::Serialize;
use shared::events::{JobEvent, JobState};
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::exit::Failure;
use crate::publisher::Broker;

/// How often manifests are checked besides the events.
const MANIFEST_POLL: Duration = Duration::from_secs(3);

/// A published job to follow.
#[derive(Debug, Clone)]
pub struct TrackedJob {
    pub job_id: Uuid,
    pub file: PathBuf,
    pub tasks: Vec<String>,
}

/// Where one task stands.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskProgress {
    /// `queued` until the first event, then the last event's state.
    pub state: String,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Why it failed or died.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Renditions asked for with `--renditions` but not made (they would upscale), from
    /// the completed task's manifest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_renditions: Vec<String>,
    /// A split transcode's segments: how many are done of how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<SegmentsDone>,
    /// Each segment's own percent, summed into `percent`.
    #[serde(skip)]
    part_percent: BTreeMap<u32, f64>,
    #[serde(skip)]
    terminal: bool,
}

/// `segments done N/M` of a split transcode.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SegmentsDone {
    pub done: u32,
    pub of: u32,
}

/// The share of a split task's progress its segments make; the stitch is the rest.
const SEGMENTS_SHARE: f64 = 95.0;

impl TaskProgress {
    fn queued() -> Self {
        Self {
            state: "queued".into(),
            attempt: 0,
            percent: None,
            worker: None,
            reason: None,
            dropped_renditions: Vec::new(),
            segments: None,
            part_percent: BTreeMap::new(),
            terminal: false,
        }
    }

    /// A part's event: its percent joins the sum over segments (audio is quick and is
    /// not counted), so one bar shows the whole task.
    fn apply_part(&mut self, part: &shared::split::PartRef, percent: Option<f64>) {
        if part.stage != "segment" || part.segments == 0 {
            return;
        }
        if let Some(p) = percent {
            let seen = self.part_percent.entry(part.index).or_insert(0.0);
            *seen = seen.max(p.clamp(0.0, 100.0));
        }
        let done = self.part_percent.values().filter(|p| **p >= 100.0).count();
        self.segments = Some(SegmentsDone {
            done: u32::try_from(done).unwrap_or(u32::MAX),
            of: part.segments,
        });
        let sum: f64 = self.part_percent.values().sum();
        self.percent = Some(sum / f64::from(part.segments) * SEGMENTS_SHARE / 100.0);
    }
}

/// The event queue of one `upload --wait`, bound before publishing.
pub struct Follower {
    /// Keeps the connection (and with it the exclusive queue) alive.
    _conn: crate::publisher::SharedConnection,
    _channel: Channel,
    consumer: Consumer,
}

impl Follower {
    /// Declares a private queue bound to every event of `job_ids` and starts consuming.
    pub async fn start(broker: &Broker, job_ids: &[Uuid]) -> anyhow::Result<Self> {
        let conn = broker.connection().await?;
        let keys: Vec<String> = job_ids.iter().map(|id| format!("job.{id}.#")).collect();
        let (channel, consumer) = shared::events::subscribe(
            &conn,
            &broker.topology.events_exchange(),
            &keys,
            "vidpipe-producer-wait",
        )
        .await?;
        Ok(Self {
            _conn: conn,
            _channel: channel,
            consumer,
        })
    }

    /// Follows `jobs` until every task is completed or dead, `timeout` passes or `stop`
    /// (e.g. [`interrupted`]) resolves with the name of what stopped it. Prints a report
    /// per job (JSON lines on stdout with `json`) and returns the command's result: Ok if
    /// all completed.
    #[allow(clippy::too_many_arguments)]
    pub async fn wait(
        mut self,
        jobs: &[TrackedJob],
        storage: &Storage,
        timeout: Option<Duration>,
        multi: &MultiProgress,
        json: bool,
        interactive: bool,
        stop: impl Future<Output = &'static str>,
    ) -> Result<(), Failure> {
        let mut stop = std::pin::pin!(stop);
        let mut stopped_by = None;
        let mut view = View::new(jobs, multi, json, interactive);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut poll = tokio::time::interval(MANIFEST_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost = None;
        while !view.all_terminal() {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                next = self.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        if let Ok(event) = serde_json::from_slice::<JobEvent>(&delivery.data) {
                            view.apply(&event);
                        }
                    }
                    Some(Err(e)) => { lost = Some(e.to_string()); break; }
                    None => { lost = Some("the event stream ended".into()); break; }
                },
                _ = poll.tick() => view.check_manifests(storage).await,
                _ = expired => break,
                signal = &mut stop => { stopped_by = Some(signal); break; }
            }
        }
        view.read_dropped_renditions(storage).await;
        view.finish();
        let ids: Vec<String> = jobs.iter().map(|j| j.job_id.to_string()).collect();
        if let Some(e) = lost {
            return Err(Failure::Infra(anyhow::anyhow!(
                "lost the broker connection while waiting ({e}); the jobs are still queued: \
                 check them with `producer status {}`",
                ids.join(" / ")
            )));
        }
        if let Some(signal) = stopped_by {
            let unfinished = view.count(|p| !p.terminal);
            return Err(Failure::Interrupted(format!(
                "stopped following at {signal} with {unfinished} task(s) not finished; the jobs \
                 keep running on the workers (nothing was cancelled). Follow them with `producer \
                 status {}`",
                ids.join("` / `producer status ")
            )));
        }
        let dead = view.count(|p| p.state == "dead");
        if dead > 0 {
            return Err(Failure::JobsFailed(format!(
                "{dead} task(s) ended dead (reasons above); after fixing the cause, re-run them with \
                 `producer dead replay {}`",
                ids.join(" / ")
            )));
        }
        let cancelled = view.count(|p| p.state == "cancelled");
        if cancelled > 0 && view.all_terminal() {
            return Err(Failure::Cancelled(format!(
                "{cancelled} task(s) were cancelled by an operator (`producer cancel`); their \
                 outputs were not made"
            )));
        }
        let unfinished = view.count(|p| !p.terminal);
        if unfinished > 0 {
            return Err(Failure::Timeout(format!(
                "gave up waiting after {:?}: {unfinished} task(s) not finished yet; they are still \
                 queued or running (see `producer status {}`)",
                timeout.unwrap_or_default(),
                ids.join(" / ")
            )));
        }
        Ok(())
    }
}

/// Starts listening for SIGINT (Ctrl-C) and SIGTERM at once (so a signal that comes
/// before the first poll is not lost) and resolves at the first with its name. Listening
/// replaces the default "die on the spot", so `--wait` can finish its lines and say what
/// to do next. Must be called inside the runtime.
pub fn interrupted() -> impl Future<Output = &'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without handlers the signals keep their default action; wait for nothing.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "Ctrl-C (SIGINT)",
            _ = term.recv() => "SIGTERM",
        }
    }
}

/// The tasks' states and how they are shown.
struct View<'a> {
    jobs: &'a [TrackedJob],
    tasks: BTreeMap<(Uuid, String), (TaskProgress, Option<ProgressBar>)>,
    json: bool,
    /// Plain lines on stderr (not a terminal, not JSON).
    plain: bool,
}

impl<'a> View<'a> {
    fn new(jobs: &'a [TrackedJob], multi: &MultiProgress, json: bool, interactive: bool) -> Self {
        let style = ProgressStyle::with_template("{prefix:24} [{bar:30}] {pos:>3}% {msg}")
            .expect("valid template")
            .progress_chars("=> ");
        let mut tasks = BTreeMap::new();
        for job in jobs {
            for task in &job.tasks {
                let bar = interactive.then(|| {
                    let bar = multi.add(ProgressBar::new(100));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("{} {task}", &job.job_id.to_string()[..8]));
                    bar.set_message("queued");
                    bar
                });
                tasks.insert((job.job_id, task.clone()), (TaskProgress::queued(), bar));
            }
        }
        Self {
            jobs,
            tasks,
            json,
            plain: !json && !interactive,
        }
    }

    fn all_terminal(&self) -> bool {
        self.tasks.values().all(|(p, _)| p.terminal)
    }

    fn count(&self, f: impl Fn(&TaskProgress) -> bool) -> usize {
        self.tasks.values().filter(|(p, _)| f(p)).count()
    }

    fn apply(&mut self, event: &JobEvent) {
        let plain = self.plain;
        let Some((progress, bar)) = self.tasks.get_mut(&(event.job_id, event.task.clone())) else {
            return;
        };
        if progress.terminal {
            return;
        }
        let before = progress.percent.unwrap_or(0.0);
        let changed = progress.state != event.state.as_str();
        progress.state = event.state.as_str().into();
        progress.attempt = event.attempt;
        progress.worker = Some(event.worker.clone());
        progress.terminal = event.state.is_terminal();
        match &event.part {
            Some(part) => progress.apply_part(part, event.percent),
            None => {
                if let Some(p) = event.percent {
                    progress.percent = Some(p);
                }
            }
        }
        if matches!(
            event.state,
            JobState::Failed | JobState::Retrying | JobState::Dead
        ) {
            progress.reason = event.detail.clone();
        }
        let percent = progress.percent.unwrap_or(0.0);
        // A bar shows its percent itself; a plain line must say it.
        let message = describe(progress, plain);
        if let Some(bar) = bar {
            bar.set_position(percent.clamp(0.0, 100.0) as u64);
            match event.state {
                JobState::Completed => bar.finish_with_message(message),
                JobState::Dead | JobState::Cancelled => bar.abandon_with_message(message),
                _ => bar.set_message(message),
            }
        } else if plain {
            // On a log, a line per state change and per quarter of progress.
            let quarter = |p: f64| (p / 25.0).floor() as i64;
            if changed || quarter(percent) > quarter(before) {
                eprintln!("job {} {}: {message}", event.job_id, event.task);
            }
        }
    }

    /// Marks tasks whose manifest exists as completed (events are best effort).
    async fn check_manifests(&mut self, storage: &Storage) {
        let pending: Vec<(Uuid, String)> = self
            .tasks
            .iter()
            .filter(|(_, (p, _))| !p.terminal)
            .map(|(k, _)| k.clone())
            .collect();
        for (job_id, task) in pending {
            let Ok(prefix) = StorageKey::output_prefix(job_id, &task) else {
                continue;
            };
            // Existence is enough here: a metadata call, not a read of the manifest. A
            // manifest wins over a cancel marker, as it does for the workers.
            let state = if let Ok(true) = storage.is_committed(&prefix).await {
                JobState::Completed
            } else if let Ok(true) = shared::cancel::is_cancelled(storage, job_id, &task).await {
                JobState::Cancelled
            } else {
                continue;
            };
            {
                let event = JobEvent {
                    job_id,
                    task: task.clone(),
                    state,
                    attempt: self.tasks[&(job_id, task.clone())].0.attempt,
                    worker: String::new(),
                    at: String::new(),
                    percent: (state == JobState::Completed).then_some(100.0),
                    detail: None,
                    part: None,
                };
                self.apply(&event);
            }
        }
    }

    /// Reads which requested renditions a completed transcode left out: they are named
    /// only in its manifest, and nobody reads a manifest to learn that 720p is missing.
    async fn read_dropped_renditions(&mut self, storage: &Storage) {
        for ((job_id, task), (p, _)) in self.tasks.iter_mut() {
            if p.state != "completed" {
                continue;
            }
            let Ok(prefix) = StorageKey::output_prefix(*job_id, task) else {
                continue;
            };
            if let Ok(Some(manifest)) = storage.manifest(&prefix).await {
                p.dropped_renditions = crate::status::dropped_renditions(&manifest);
            }
        }
    }

    /// Prints the outcome: reasons of dead tasks on stderr, JSON reports on stdout.
    fn finish(&self) {
        for (job_id, task) in self.tasks.keys() {
            let (p, bar) = &self.tasks[&(*job_id, task.clone())];
            if let Some(bar) = bar.as_ref().filter(|b| !b.is_finished()) {
                bar.abandon_with_message(describe(p, false));
            }
            if !self.json {
                match p.state.as_str() {
                    "dead" => eprintln!(
                        "job {job_id} {task}: dead after {} attempt(s): {}",
                        p.attempt,
                        p.reason.as_deref().unwrap_or("(no reason given)")
                    ),
                    "completed" => eprintln!(
                        "job {job_id} {task}: completed ({}){}",
                        StorageKey::output_prefix(*job_id, task)
                            .map(|prefix| prefix.to_string())
                            .unwrap_or_default(),
                        crate::status::dropped_note(&p.dropped_renditions)
                    ),
                    "cancelled" => eprintln!("job {job_id} {task}: cancelled by an operator"),
                    _ => eprintln!("job {job_id} {task}: not finished ({})", describe(p, true)),
                }
            }
        }
        if self.json {
            for job in self.jobs {
                let tasks: BTreeMap<&str, &TaskProgress> = job
                    .tasks
                    .iter()
                    .map(|t| (t.as_str(), &self.tasks[&(job.job_id, t.clone())].0))
                    .collect();
                crate::say!(
                    "{}",
                    serde_json::json!({ "job_id": job.job_id, "file": job.file, "tasks": tasks })
                );
            }
        }
    }
}

/// `started (attempt 1, worker-a)`, `progress 50% (attempt 1, worker-a)`,
/// `retrying (attempt 1): reason`, `dead (attempt 3): reason`, ….
fn describe(p: &TaskProgress, with_percent: bool) -> String {
    let worker = p.worker.as_deref().filter(|w| !w.is_empty());
    match p.state.as_str() {
        "queued" => "queued".into(),
        "cancelled" => "cancelled by an operator".into(),
        "failed" | "retrying" | "dead" => format!(
            "{} (attempt {}): {}",
            p.state,
            p.attempt,
            p.reason.as_deref().unwrap_or("no reason given")
        ),
        state => {
            // The percent is what a log reader follows; "completed 100%" says nothing more.
            let mut percent = p
                .percent
                .filter(|_| with_percent && state != "completed")
                .map(|pc| format!(" {:.0}%", pc.clamp(0.0, 100.0).floor()))
                .unwrap_or_default();
            if let Some(s) = p.segments.filter(|_| state != "completed") {
                percent.push_str(&format!(", segments done {}/{}", s.done, s.of));
            }
            match worker {
                Some(w) => format!("{state}{percent} (attempt {}, {w})", p.attempt),
                None => format!("{state}{percent}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::split::PartRef;

    #[test]
    fn a_split_task_shows_its_segments_summed_and_counted() {
        let mut p = TaskProgress::queued();
        p.apply_part(&PartRef::segment(0, 4), Some(100.0));
        p.apply_part(&PartRef::segment(1, 4), Some(50.0));
        // A late, smaller percent of a redelivered segment does not move the bar back.
        p.apply_part(&PartRef::segment(0, 4), Some(10.0));
        // Audio is not a segment.
        p.apply_part(&PartRef::audio(4), Some(100.0));
        assert_eq!(p.segments, Some(SegmentsDone { done: 1, of: 4 }));
        let percent = p.percent.unwrap();
        assert!((percent - 150.0 / 4.0 * 0.95).abs() < 1e-9, "{percent}");
        p.state = "progress".into();
        p.attempt = 1;
        assert_eq!(describe(&p, true), "progress 35%, segments done 1/4");
    }
}
