//! The jobs a worker is running right now: one entry per delivery, with the token that
//! stops it, whether an operator asked it to stop, and its last progress.
//!
//! Two readers share it: the cancel listener ([`crate::cancel`]), which finds the
//! entries of a cancelled job and fires their tokens, and the heartbeat
//! ([`crate::workers`]), which reports them with their percent. The runtime adds an
//! entry when a delivery starts ([`InFlight::track`]) and the guard removes it when the
//! delivery is settled, so the map never outlives the jobs in it.
//!
//! Why a flag beside the token: a cancelled handler only says "cancelled"; the flag tells
//! the runtime it was the operator (ack, no retry, `cancelled` event) and not shutdown or
//! the time limit (requeue or retry). [`Tracked::settle`] does that translation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::outcome::{JobError, Outcome};
use crate::split::PartRef;

/// One running delivery.
struct Entry {
    job_id: Uuid,
    task: &'static str,
    part: Option<PartRef>,
    /// Stops the handler (a child of the session's token: shutdown still reaches it).
    token: CancellationToken,
    /// Set before `token` fires when an operator cancelled the job.
    by_operator: Arc<AtomicBool>,
    /// Last reported percent, as `f64` bits (0 until the first progress).
    percent: Arc<AtomicU64>,
    started: Instant,
}

/// The worker's running deliveries. Cheap to clone (shared map).
#[derive(Clone, Default)]
pub struct InFlight {
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
    next: Arc<AtomicU64>,
}

/// A running job as heartbeats report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningJob {
    pub job_id: Uuid,
    pub task: String,
    /// For a part of a split task: `segment 3/10` or `audio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    pub percent: f64,
    pub running_s: f64,
}

/// An entry of [`InFlight`], removed when dropped.
pub struct Tracked {
    id: u64,
    map: InFlight,
    token: CancellationToken,
    by_operator: Arc<AtomicBool>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a delivery of `job_id`'s `task` that starts now; its token is a child of
    /// `session` (the session's cancel-all token).
    pub fn track(
        &self,
        job_id: Uuid,
        task: &'static str,
        part: Option<&PartRef>,
        session: &CancellationToken,
    ) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = session.child_token();
        let by_operator = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            id,
            Entry {
                job_id,
                task,
                part: part.cloned(),
                token: token.clone(),
                by_operator: by_operator.clone(),
                percent: Arc::new(AtomicU64::new(0f64.to_bits())),
                started: Instant::now(),
            },
        );
        Tracked {
            id,
            map: self.clone(),
            token,
            by_operator,
        }
    }

    /// Stops every running delivery of `job_id` (of `task` only, if given) on an
    /// operator's request; how many were stopped.
    pub fn cancel(&self, job_id: Uuid, task: Option<&str>) -> usize {
        let entries = self.lock();
        let mut stopped = 0;
        for entry in entries.values() {
            if entry.job_id == job_id && task.is_none_or(|t| t == entry.task) {
                entry.by_operator.store(true, Ordering::SeqCst);
                entry.token.cancel();
                stopped += 1;
            }
        }
        stopped
    }

    /// Records progress of `job_id`'s delivery (the one of `part`, for a split task).
    pub fn progress(&self, job_id: Uuid, task: &str, part: Option<&PartRef>, percent: f64) {
        for entry in self.lock().values() {
            if entry.job_id == job_id && entry.task == task && entry.part.as_ref() == part {
                entry.percent.store(percent.to_bits(), Ordering::Relaxed);
            }
        }
    }

    /// What is running, oldest first.
    pub fn snapshot(&self) -> Vec<RunningJob> {
        let mut jobs: Vec<(Instant, RunningJob)> = self
            .lock()
            .values()
            .map(|e| {
                (
                    e.started,
                    RunningJob {
                        job_id: e.job_id,
                        task: e.task.to_owned(),
                        part: e.part.as_ref().map(PartRef::label),
                        percent: f64::from_bits(e.percent.load(Ordering::Relaxed)),
                        running_s: e.started.elapsed().as_secs_f64(),
                    },
                )
            })
            .collect();
        jobs.sort_by_key(|(started, _)| *started);
        jobs.into_iter().map(|(_, j)| j).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the worker runs one job at most: then it sends a job's ack and events
    /// itself, at once, instead of leaving them to be sent together with other jobs'
    /// (see `Settlement::ack_now` and `EventPublisher::send`).
    pub fn at_most_one(&self) -> bool {
        self.len() <= 1
    }
}

impl Tracked {
    /// The token that stops this delivery's handler.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Whether an operator cancelled this delivery.
    pub fn by_operator(&self) -> bool {
        self.by_operator.load(Ordering::SeqCst)
    }

    /// The delivery's outcome with the operator's cancel told apart: a handler stopped
    /// (or timed out while stopping) because the operator cancelled the job is
    /// [`Outcome::CancelledByOperator`]. Anything that finished is left alone: a
    /// committed manifest wins over a late cancel.
    pub fn settle(&self, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Failed(JobError::Cancelled) | Outcome::TimedOut(_) if self.by_operator() => {
                Outcome::CancelledByOperator
            }
            other => other,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.map.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cancel_stops_only_the_named_job_and_task_and_marks_it_as_the_operators() {
        let map = InFlight::default();
        let session = CancellationToken::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let a_transcode = map.track(a, "transcode", None, &session);
        let a_thumb = map.track(a, "thumbnail", None, &session);
        let b_transcode = map.track(b, "transcode", None, &session);
        assert_eq!(map.cancel(a, Some("thumbnail")), 1);
        assert!(a_thumb.token().is_cancelled() && a_thumb.by_operator());
        assert!(!a_transcode.token().is_cancelled());
        assert_eq!(map.cancel(a, None), 2);
        assert!(!b_transcode.token().is_cancelled());
        assert_eq!(map.cancel(Uuid::new_v4(), None), 0);

        let cancelled = Outcome::Failed(JobError::Cancelled);
        assert_eq!(
            a_transcode.settle(cancelled.clone()),
            Outcome::CancelledByOperator
        );
        assert_eq!(
            a_transcode.settle(Outcome::Completed),
            Outcome::Completed,
            "a finished job stays finished"
        );
        assert_eq!(b_transcode.settle(cancelled.clone()), cancelled);
        drop(a_thumb);
        assert_eq!(map.len(), 2, "a settled delivery leaves the map");
    }

    #[test]
    fn shutdown_reaches_tracked_jobs_without_marking_them() {
        let map = InFlight::default();
        let session = CancellationToken::new();
        let job = map.track(Uuid::new_v4(), "transcode", None, &session);
        session.cancel();
        assert!(job.token().is_cancelled() && !job.by_operator());
        assert_eq!(
            job.settle(Outcome::TimedOut(Duration::from_secs(1))),
            Outcome::TimedOut(Duration::from_secs(1))
        );
    }

    #[test]
    fn progress_is_reported_per_part() {
        let map = InFlight::default();
        let session = CancellationToken::new();
        let id = Uuid::new_v4();
        let _s0 = map.track(id, "transcode", Some(&PartRef::segment(0, 2)), &session);
        let _s1 = map.track(id, "transcode", Some(&PartRef::segment(1, 2)), &session);
        map.progress(id, "transcode", Some(&PartRef::segment(1, 2)), 40.0);
        let snap = map.snapshot();
        let percent: Vec<f64> = snap.iter().map(|j| j.percent).collect();
        assert_eq!(percent, [0.0, 40.0]);
        assert_eq!(snap[1].part.as_deref(), Some("segment 2/2"));
    }
}
