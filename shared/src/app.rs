//! The shared `main` of a worker binary: flags, settings, telemetry, storage, the health
//! endpoint and the signal handler, then [`runtime::run`]. A worker's own `main.rs` only
//! says which handler to build.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::handler::Handler;
use crate::health::Health;
use crate::messages::JobMessage;
use crate::runtime::{self, WorkerOptions};
use crate::settings::{self, Loaded};
use crate::storage::Storage;
use crate::tasks::TaskKind;
use crate::{shutdown, telemetry};

/// What a worker binary tells [`worker_main`] about itself.
#[derive(Debug, Clone, Copy)]
pub struct WorkerInfo {
    pub name: &'static str,
    pub about: &'static str,
    /// Jobs at once when `worker.concurrency` is unset.
    pub default_concurrency: u16,
}

/// Exit code for a bad setting or flag.
pub const EXIT_USAGE: u8 = 2;

/// Runs a worker process. `build` makes the handler from the loaded settings.
pub fn worker_main<H: Handler>(
    info: WorkerInfo,
    build: impl FnOnce(&Loaded) -> anyhow::Result<H>,
) -> ExitCode {
    let matches = command(&info).get_matches();
    let loaded = match settings::load(matches.get_one::<PathBuf>("config").map(PathBuf::as_path)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e:#}", info.name);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    telemetry::init(&loaded.settings.log);
    if matches.get_flag("declare-topology") {
        return declare_topology(&loaded.settings, <H::Job as JobMessage>::KIND);
    }
    let handler = match build(&loaded) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let s = &loaded.settings;
        let storage = Storage::from_settings(&s.storage)?;
        let health = Health::new();
        // Before the endpoint opens, so the first scrape already lists every series.
        let _ = health.track_task(<H::Job as JobMessage>::TASK);
        let shutdown = shutdown::on_signals();
        // Not the shutdown token: while in-flight jobs drain after SIGTERM the process is
        // alive (/healthz 200) but not ready (/readyz 503); the endpoint goes with it.
        let stop_health = CancellationToken::new();
        if s.health.enabled {
            health.clone().serve(&s.health, stop_health.clone()).await?;
        }
        let options = WorkerOptions {
            concurrency: s.worker.concurrency.unwrap_or(info.default_concurrency),
            settings: s.clone(),
            storage,
            health,
        };
        let result = runtime::run(handler, options, shutdown).await;
        stop_health.cancel();
        result
    });
    // Don't wait for a codec thread that ignores cancellation: exit now.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}

/// The worker's command line: `--config` and `--declare-topology`.
fn command(info: &WorkerInfo) -> clap::Command {
    clap::Command::new(info.name)
        .about(info.about)
        .after_help(
            "Settings come from built-in defaults, then the --config file (or $VIDPIPE_CONFIG), then\n\
             VIDPIPE__SECTION__KEY environment variables, e.g. VIDPIPE__AMQP__URL=amqp://user:pass@host:5672/%2f\n\
             or VIDPIPE__WORKER__CONCURRENCY=2. See the README's settings table.",
        )
        .arg(
            clap::Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML settings file"),
        )
        .arg(
            clap::Arg::new("declare-topology")
                .long("declare-topology")
                .action(clap::ArgAction::SetTrue)
                .help("Declare the broker topology (exchanges, queues, retry tiers) and exit; for an administrator when workers run with topology.declare = false"),
        )
}

/// `--declare-topology`: declare everything once (the builtin kinds and this worker's
/// own), then exit (0 on success).
fn declare_topology(settings: &crate::settings::Settings, kind: TaskKind) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let conn = crate::broker::try_connect(&settings.amqp, "vidpipe-declare-topology").await?;
        let channel = conn.create_channel().await?;
        let topology = crate::topology::Topology::from_settings(settings).with_kind(kind);
        topology.declare(&channel).await?;
        let _ = conn.close(200, "done".into()).await;
        Ok::<_, lapin::Error>(())
    });
    match result {
        Ok(()) => {
            tracing::info!("topology declared");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let first = settings
                .amqp
                .addresses()
                .first()
                .copied()
                .unwrap_or_default();
            match crate::broker::refusal(first, &e.to_string()) {
                Some(why) => tracing::error!("{why}; could not declare the topology"),
                None => tracing::error!(error = %e, "could not declare the topology"),
            }
            ExitCode::FAILURE
        }
    }
}
