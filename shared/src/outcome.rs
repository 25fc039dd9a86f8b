//! From a job's outcome to what we tell the broker: one pure, table-tested function.
//!
//! Errors say what to do: [`JobError::Permanent`] (retrying cannot help: bad input,
//! unsupported codec, missing source) and [`JobError::Transient`] (may work later: storage
//! hiccup, time limit, broker blip). Handlers use `anyhow` inside and classify once at the
//! boundary; anything unclassified is transient, with the attempt cap as the backstop.

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
}

/// Unclassified errors are transient: the attempt cap bounds the cost of being wrong.
impl From<anyhow::Error> for JobError {
    fn from(err: anyhow::Error) -> Self {
        JobError::transient(err)
    }
}

/// Everything that can happen to one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Failed(JobError),
    /// The message could not be parsed or validated.
    Poison(String),
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
        Outcome::Completed => Action::Ack,
        Outcome::Failed(JobError::Cancelled) => Action::Requeue,
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

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            delays: vec![Duration::from_secs(5), Duration::from_secs(30)],
        }
    }

    #[test]
    fn decision_table() {
        let t = |s: &str| Outcome::Failed(JobError::Transient(s.into()));
        let cases: Vec<(Outcome, u32, Action)> = vec![
            (Outcome::Completed, 1, Action::Ack),
            (Outcome::Completed, 9, Action::Ack),
            (Outcome::Failed(JobError::Cancelled), 1, Action::Requeue),
            (Outcome::Failed(JobError::Cancelled), 4, Action::Requeue),
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
}
