//! How a command ends, and the exit code each ending maps to.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | done (with `--wait`: every task completed) |
//! | 1 | a task is dead (`--wait`), or the job asked for is unknown / has dead tasks |
//! | 2 | usage error: bad flag, bad file, bad setting, missing confirmation |
//! | 3 | broker or storage trouble |
//! | 4 | `--wait --timeout` ran out before every task finished |
//! | 5 | `--wait` stopped by Ctrl-C (SIGINT) or SIGTERM; the jobs keep running |
//! | 6 | `--wait`: a task was cancelled by an operator (`producer cancel`), none dead |

use std::process::ExitCode;

/// A command's failure, carrying the message for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The operator asked for something we cannot do as asked; nothing was changed.
    #[error("{0:#}")]
    Usage(anyhow::Error),
    /// Jobs ran and at least one task ended dead (the reasons were printed).
    #[error("{0}")]
    JobsFailed(String),
    /// The broker or the storage did not cooperate.
    #[error("{0:#}")]
    Infra(anyhow::Error),
    /// `--timeout` ran out.
    #[error("{0}")]
    Timeout(String),
    /// `--wait` was stopped by SIGINT or SIGTERM: only the following stopped, the jobs did
    /// not, so this is neither a failure of theirs nor a shell's "killed by a signal".
    #[error("{0}")]
    Interrupted(String),
    /// `--wait`: a task ended cancelled (and none dead).
    #[error("{0}")]
    Cancelled(String),
}

impl Failure {
    pub fn usage(msg: impl std::fmt::Display) -> Self {
        Self::Usage(anyhow::anyhow!("{msg}"))
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::JobsFailed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Infra(_) => 3,
            Failure::Timeout(_) => 4,
            Failure::Interrupted(_) => 5,
            Failure::Cancelled(_) => 6,
        }
    }
}

/// Exit code of a successful command.
pub fn success() -> ExitCode {
    ExitCode::SUCCESS
}

/// `?` on broker and storage calls: anything unclassified is infrastructure trouble.
pub trait InfraContext<T> {
    fn infra(self) -> Result<T, Failure>;
}

impl<T> InfraContext<T> for anyhow::Result<T> {
    fn infra(self) -> Result<T, Failure> {
        self.map_err(Failure::Infra)
    }
}
