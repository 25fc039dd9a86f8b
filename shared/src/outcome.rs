//! From a job's outcome to what we tell the broker: one pure, table-tested function.
//!
//! Errors say what to do: [`JobError::Permanent`] (retrying cannot help: bad input,
//! unsupported codec, missing source) and [`JobError::Transient`] (may work later: storage
//! hiccup, time limit, broker blip). Handlers use `anyhow` inside, with `.context(…)` at
//! each step, mark what retrying cannot fix with [`permanent`] / [`PermanentExt::permanent`]
//! and stopping on request with [`Cancelled`], and classify once at the boundary
//! ([`JobError::classify`]); anything unmarked is transient, with the attempt cap as the
//! backstop.

use std::time::Duration;

/// How a job failed, named by what the runtime should do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// Retrying cannot help. Goes to the dead letters at once.
    #[error("{0}")]
    Permanent(String),
    /// May work later. Retried with backoff until attempts are spent.
    #[error("{0}")]
    Transient(String),
    /// Stopped because the worker is shutting down (or the time limit hit; the runtime
    /// knows which). Not the job's fault.
    #[error("cancelled")]
    Cancelled,
}

impl JobError {
    /// A permanent error from any error chain, keeping its context (`a: b: c`).
    pub fn permanent(err: impl std::fmt::Display) -> Self {
        JobError::Permanent(format!("{err:#}"))
    }
    /// A transient error from any error chain, keeping its context.
    pub fn transient(err: impl std::fmt::Display) -> Self {
        JobError::Transient(format!("{err:#}"))
    }

    /// The one classification of a handler's error, done once at the handler boundary:
    /// [`Cancelled`] anywhere in the chain means cancelled, [`Permanent`] means permanent,
    /// anything else is transient (the attempt cap bounds the cost of being wrong). The
    /// reason keeps the whole cause chain (`a: b: c`).
    pub fn classify(err: anyhow::Error) -> Self {
        for cause in err.chain() {
            if cause.is::<Cancelled>() {
                return JobError::Cancelled;
            }
            if cause.is::<Permanent>() {
                return JobError::permanent(err);
            }
        }
        JobError::transient(err)
    }
}

/// Classifies with [`JobError::classify`], so `?` on an `anyhow::Error` in a handler
/// keeps the markers.
impl From<anyhow::Error> for JobError {
    fn from(err: anyhow::Error) -> Self {
        JobError::classify(err)
    }
}

/// Marks an error as permanent (retrying cannot help). It is invisible in the reason: it
/// shows the marked error's own message and keeps its causes, so `.context(…)` added
/// above or below it reads as if the marker were not there. Make one with [`permanent`]
/// or [`PermanentExt::permanent`]; [`JobError::classify`] finds it with a downcast.
///
/// Mark at the leaf, where the failure is known: the marked error's own outermost type
/// is no longer found by a downcast (its causes still are), so a typed error that code
/// looks for later (`Cancelled`, the transcoder's `StoppedEarly`) is left unmarked.
#[derive(Debug)]
pub struct Permanent(anyhow::Error);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The marked error's outermost message only; its causes follow through `source`.
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A permanent failure with `reason`, e.g. `return Err(permanent("source is empty"))`.
pub fn permanent(reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Permanent(anyhow::anyhow!("{reason}")))
}

/// `.permanent()` on a `Result`: its error, context and causes kept, marked permanent.
pub trait PermanentExt<T> {
    fn permanent(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> PermanentExt<T> for Result<T, E> {
    fn permanent(self) -> anyhow::Result<T> {
        self.map_err(mark_permanent)
    }
}

/// `err`, context and causes kept, marked permanent.
pub fn mark_permanent(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Permanent(err.into()))
}

/// The job stopped because it was asked to (shutdown, the time limit or an operator's
/// cancel; the runtime knows which): becomes
/// [`JobError::Cancelled`]. See [`is_cancelled`] for code that picks between errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Whether `err` is, or was caused by, a [`Cancelled`].
pub fn is_cancelled(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<Cancelled>())
}

/// Everything that can happen to one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    /// Already done by an earlier delivery (or the task it is a part of is): acked, no
    /// second `completed` event.
    Duplicate,
    /// Split into this many parts, each published with a confirm (see [`crate::split`]).
    FannedOut(usize),
    Failed(JobError),
    /// The message could not be parsed or validated.
    Poison(String),
    /// An operator cancelled the job (`producer cancel`): its marker was found at
    /// delivery, or the handler was stopped by the operator's control message.
    CancelledByOperator,
    /// The per-job time limit expired: transient on a first attempt (the machine may have
    /// been busy), dead on any later one, so one hostile file costs at most two limits.
    TimedOut(Duration),
}

/// What the runtime does with the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Ack,
    /// Publish to retry tier `tier` with attempt header `attempt` (confirm), then ack.
    Retry {
        tier: usize,
        attempt: u32,
        reason: String,
    },
    /// Publish to the parking lot with the reason (confirm), then ack.
    Dead {
        reason: String,
    },
    /// Nack with requeue: not the job's fault, no attempt used.
    Requeue,
    /// Ack without a retry or a dead letter: the operator cancelled the job, and
    /// `cancelled` is its terminal state (recorded by the marker in storage).
    Discard,
}

/// Retry policy: how many attempts in all, and the backoff of each retry tier.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first; after this many failures the job is dead.
    pub max_attempts: u32,
    /// Delay of each retry tier; retry `n` (1-based) uses tier `min(n, len) - 1`.
    pub delays: Vec<Duration>,
}

/// Decides the broker action. `attempt` is the 1-based number of the attempt that just
/// ran (1 = first delivery).
pub fn decide(outcome: &Outcome, attempt: u32, policy: &RetryPolicy) -> Action {
    let transient = |reason: String| {
        if attempt >= policy.max_attempts || policy.delays.is_empty() {
            Action::Dead {
                reason: format!("gave up after {attempt} attempts: {reason}"),
            }
        } else {
            let tier = (attempt as usize).min(policy.delays.len()) - 1;
            Action::Retry {
                tier,
                attempt: attempt + 1,
                reason,
            }
        }
    };
    match outcome {
        Outcome::Completed | Outcome::Duplicate | Outcome::FannedOut(_) => Action::Ack,
        Outcome::Failed(JobError::Cancelled) => Action::Requeue,
        Outcome::CancelledByOperator => Action::Discard,
        Outcome::Failed(JobError::Transient(reason)) => transient(reason.clone()),
        Outcome::TimedOut(limit) if attempt >= 2 => Action::Dead {
            reason: format!(
                "job exceeded its time limit of {limit:?} again on attempt {attempt}; a source \
                 that takes this long is not retried further"
            ),
        },
        Outcome::TimedOut(limit) => transient(format!("job exceeded its time limit of {limit:?}")),
        Outcome::Failed(JobError::Permanent(reason)) => Action::Dead {
            reason: reason.clone(),
        },
        Outcome::Poison(reason) => Action::Dead {
            reason: format!("poison message: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            delays: vec![Duration::from_secs(5), Duration::from_secs(30)],
        }
    }

    // One row per failure path; the table is the point, so it stays one function.
    #[test]
    fn decision_table() {
        let t = |s: &str| Outcome::Failed(JobError::Transient(s.into()));
        let cases: Vec<(Outcome, u32, Action)> = vec![
            (Outcome::Completed, 1, Action::Ack),
            (Outcome::Completed, 9, Action::Ack),
            (Outcome::Failed(JobError::Cancelled), 1, Action::Requeue),
            (Outcome::Failed(JobError::Cancelled), 4, Action::Requeue),
            // The operator's cancel is final at any attempt: no retry, no dead letter.
            (Outcome::CancelledByOperator, 1, Action::Discard),
            (Outcome::CancelledByOperator, 4, Action::Discard),
            (
                t("io"),
                1,
                Action::Retry {
                    tier: 0,
                    attempt: 2,
                    reason: "io".into(),
                },
            ),
            (
                t("io"),
                2,
                Action::Retry {
                    tier: 1,
                    attempt: 3,
                    reason: "io".into(),
                },
            ),
            // Past the last tier the last delay repeats.
            (
                t("io"),
                3,
                Action::Retry {
                    tier: 1,
                    attempt: 4,
                    reason: "io".into(),
                },
            ),
            (
                t("io"),
                4,
                Action::Dead {
                    reason: "gave up after 4 attempts: io".into(),
                },
            ),
            (
                Outcome::TimedOut(Duration::from_secs(2)),
                1,
                Action::Retry {
                    tier: 0,
                    attempt: 2,
                    reason: "job exceeded its time limit of 2s".into(),
                },
            ),
            (
                Outcome::TimedOut(Duration::from_secs(2)),
                2,
                Action::Dead {
                    reason: "job exceeded its time limit of 2s again on attempt 2; a source \
                             that takes this long is not retried further"
                        .into(),
                },
            ),
            (
                Outcome::Failed(JobError::Permanent("not a video".into())),
                1,
                Action::Dead {
                    reason: "not a video".into(),
                },
            ),
            (
                Outcome::Poison("bad json".into()),
                1,
                Action::Dead {
                    reason: "poison message: bad json".into(),
                },
            ),
        ];
        for (outcome, attempt, want) in cases {
            assert_eq!(
                decide(&outcome, attempt, &policy()),
                want,
                "{outcome:?} at attempt {attempt}"
            );
        }
    }

    #[test]
    fn no_tiers_means_no_retries() {
        let p = RetryPolicy {
            max_attempts: 5,
            delays: vec![],
        };
        let got = decide(&Outcome::Failed(JobError::Transient("x".into())), 1, &p);
        assert!(matches!(got, Action::Dead { .. }));
    }

    #[test]
    fn anyhow_errors_default_to_transient_with_context() {
        let err = anyhow::anyhow!("disk full").context("writing 720p.mp4");
        assert_eq!(
            JobError::from(err),
            JobError::Transient("writing 720p.mp4: disk full".into())
        );
    }

    #[test]
    fn permanent_marker_survives_context_and_keeps_the_chain() {
        let io = std::io::Error::other("bad header");
        let err = Err::<(), _>(io)
            .context("reading the source")
            .permanent()
            .context("probing")
            .unwrap_err();
        assert_eq!(
            JobError::classify(err),
            JobError::Permanent("probing: reading the source: bad header".into())
        );
        let err = permanent("source is empty (0 bytes)").context("opening the source");
        assert_eq!(
            JobError::from(err),
            JobError::Permanent("opening the source: source is empty (0 bytes)".into())
        );
    }

    #[test]
    fn cancelled_marker_wins_through_context() {
        let err = anyhow::Error::new(Cancelled).context("encoding 720p");
        assert!(is_cancelled(&err));
        assert_eq!(JobError::classify(err), JobError::Cancelled);
        assert!(!is_cancelled(&permanent("x")));
    }
}
