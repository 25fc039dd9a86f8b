//! The `producer` CLI as a library (the binary only parses flags; the benchmark drives the
//! same publish path).
//!
//! - [`cli`]: commands, flags and their `--help`.
//! - [`exit`]: how a command ends and the exit code for each ending.
//! - [`publisher`]: broker access: deadpool-lapin pool, topology, confirmed publishing.
//! - [`upload`]: checking files, building the jobs, storing and publishing them.
//! - [`settle`]: which files of a watched folder count, when they are fully written, the
//!   watch state file.
//! - [`watch`]: uploading what appears in a folder, once, when fully written.
//! - [`wait`]: following `video_events` until every task is completed or dead.
//! - [`status`]: one job's state from its manifests, cancel markers and the dead-letter queue.
//! - [`cancel`]: cancelling a job's unfinished tasks (markers, then the live stop).
//! - [`workers`]: the live workers, from their heartbeats on `video_events`.
//! - [`dead`]: listing, showing, replaying and purging parked messages.
//! - [`tasks`]: printing the task registry and the broker users derived from it.

pub mod cancel;
pub mod cli;
pub mod dead;
pub mod exit;
pub mod publisher;
pub mod settle;
pub mod status;
pub mod tasks;
pub mod upload;
pub mod wait;
pub mod watch;
pub mod workers;

use std::process::ExitCode;

use shared::settings::{self, Settings};
use shared::telemetry;

use crate::cli::{Cli, Command};
use crate::exit::Failure;

/// Runs one parsed command line to its exit code.
pub fn main_with(cli: Cli) -> ExitCode {
    // Before settings: scripts call it where no vidpipe settings exist (a broker host,
    // the compose stack's one-shot `secrets` service).
    if let Command::Tasks(args) = &cli.command {
        tasks::run(args);
        return exit::success();
    }
    let loaded = match settings::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("producer: {e:#}");
            return ExitCode::from(Failure::usage("").exit_code());
        }
    };
    telemetry::init(&loaded.settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("producer: cannot start the async runtime: {e}");
            return ExitCode::from(Failure::Infra(e.into()).exit_code());
        }
    };
    let result = runtime.block_on(run(cli.command, &loaded.settings));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => exit::success(),
        Err(failure) => {
            eprintln!("producer: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Runs one command.
pub async fn run(command: Command, settings: &Settings) -> Result<(), Failure> {
    match command {
        Command::Upload(args) => upload::run(settings, args).await,
        Command::Watch(args) => watch::run(settings, args).await,
        Command::Status(args) => status::run(settings, args).await,
        Command::Cancel(args) => cancel::run(settings, args).await,
        Command::Workers(args) => workers::run(settings, args).await,
        Command::Dead(cmd) => dead::run(settings, cmd).await,
        Command::Tasks(args) => {
            tasks::run(&args);
            Ok(())
        }
    }
}

/// Parses a job id argument, as a usage error naming it when it is not a UUID.
pub fn parse_job_id(s: &str) -> Result<uuid::Uuid, Failure> {
    s.parse().map_err(|_| {
        Failure::usage(format!(
            "`{s}` is not a job id: job ids are UUIDs as printed by `producer upload`"
        ))
    })
}

/// `println!` that shrugs off a closed stdout (`producer dead list | head`).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
