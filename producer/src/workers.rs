//! `producer workers`: the workers that are live, heard on `video_events`.
//!
//! There is no database of workers: each announces itself every
//! `worker.heartbeat_secs` (see `shared::workers`). So this command binds a private
//! queue to `worker.#` and listens for a little more than one heartbeat period
//! (`--listen` to change it); every live worker is heard at least once in that time. A
//! worker heard but silent for longer than `worker.gone_after_secs` is shown `gone`, one
//! that said goodbye `stopped`; `--all` lists those too (the default lists the live
//! ones). A worker killed before the listening began is simply not heard: it is absent.

use std::time::{Duration, Instant};

use futures::StreamExt;
use shared::settings::Settings;
use shared::workers::{Listed, Liveness, Roster};

use crate::cli::WorkersArgs;
use crate::exit::{Failure, InfraContext as _};
use crate::publisher::Broker;

/// How long to listen by default: one heartbeat period and a half, plus a second for
/// the broker round trips.
pub fn default_listen(settings: &Settings) -> Duration {
    Duration::from_secs_f64(settings.worker.heartbeat_secs * 1.5 + 1.0)
}

/// `producer workers`.
pub async fn run(settings: &Settings, args: WorkersArgs) -> Result<(), Failure> {
    let listen = match args.listen {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(Failure::usage(format!(
                "--listen {s}: must be a positive number of seconds"
            )));
        }
        None => default_listen(settings),
    };
    let gone_after = Duration::from_secs_f64(settings.worker.gone_after_secs);
    let broker = Broker::connect(settings).await?;
    let roster = listen_for(&broker, listen).await.infra()?;
    let listed: Vec<Listed> = roster
        .list(Instant::now(), gone_after)
        .into_iter()
        .filter(|l| args.all || l.liveness == Liveness::Live)
        .collect();
    if args.json {
        for l in &listed {
            crate::say!("{}", serde_json::to_string(l).expect("JSON"));
        }
    } else {
        print_table(&listed, listen);
    }
    Ok(())
}

/// Everything heard on `worker.#` during `listen`.
async fn listen_for(broker: &Broker, listen: Duration) -> anyhow::Result<Roster> {
    let conn = broker.connection().await?;
    let (channel, mut consumer) = shared::events::subscribe(
        &conn,
        &broker.topology.events_exchange(),
        &[format!("{}.#", shared::workers::ROUTING_PREFIX)],
        "vidpipe-producer-workers",
    )
    .await?;
    let mut roster = Roster::default();
    let deadline = tokio::time::sleep(listen);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => roster.hear(&delivery.data, Instant::now()),
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("listening for workers")),
                None => break,
            },
        }
    }
    let _ = channel.close(200, "done listening".into()).await;
    Ok(roster)
}

/// The human table: one line per worker, then one per job it runs.
fn print_table(listed: &[Listed], listen: Duration) {
    if listed.is_empty() {
        crate::say!("no live workers heard in {listen:?}");
        return;
    }
    crate::say!(
        "{:<24} {:<10} {:<8} {:<20} {:>5} {:>8} {:<8} state",
        "WORKER",
        "KIND",
        "VERSION",
        "HOST",
        "JOBS",
        "UPTIME",
        "HEARD"
    );
    for l in listed {
        let a = &l.announcement;
        let state = match l.liveness {
            Liveness::Live => "live",
            Liveness::Stopped => "stopped",
            Liveness::Gone => "gone",
        };
        crate::say!(
            "{:<24} {:<10} {:<8} {:<20} {:>5} {:>8} {:<8} {state}",
            a.id,
            a.kind,
            a.version,
            a.host,
            format!("{}/{}", a.in_flight.len(), a.concurrency),
            format!("{:.0}s", a.uptime_s),
            format!("{:.0}s ago", l.last_heard_s),
        );
        for job in &a.in_flight {
            crate::say!(
                "    {} {}{} {:.0}% ({:.0}s)",
                job.job_id,
                job.task,
                job.part
                    .as_deref()
                    .map(|p| format!(" {p}"))
                    .unwrap_or_default(),
                job.percent,
                job.running_s
            );
        }
    }
}
