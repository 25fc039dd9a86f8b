//! `producer cancel JOB_ID [--task T]`: make a job's unfinished tasks `cancelled`.
//!
//! In this order, so that nothing can be lost and the race with a finishing worker is
//! reported as it happened (see `shared::cancel` for the whole design):
//!
//! 1. Read the job's state as `status` does. An unknown job is an error; tasks already
//!    completed, dead or cancelled are reported and left alone.
//! 2. Write a cancel marker per task still pending (create-if-absent). From here on, any
//!    delivery of it (queued, retried, redelivered, a segment, the stitch) is dropped.
//! 3. Publish the control message on `video_events`, so workers running it stop now.
//! 4. Look at the manifests again: a task that completed between 1 and 2 keeps its
//!    result (a committed manifest wins); its marker is removed and it is reported as
//!    "completed before the cancel".
//!
//! Exit code 0 if at least one task was cancelled, 1 if the job is unknown or nothing in
//! it was left to cancel (nothing was changed), 3 broker or storage trouble.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde::Serialize;
use shared::cancel::{self, CancelMarker, CancelRequest};
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::cli::CancelArgs;
use crate::exit::{Failure, InfraContext as _};
use crate::publisher::Broker;
use crate::status::{self, TaskStatus};

/// What the command did to one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Marked cancelled now: dropped when delivered, stopped if running.
    Cancelled,
    /// Already finished; nothing changed.
    AlreadyCompleted,
    AlreadyDead,
    AlreadyCancelled,
    /// Completed in the moment between our look and our marker: the result stands.
    CompletedFirst,
}

impl Outcome {
    fn describe(self) -> &'static str {
        match self {
            Outcome::Cancelled => {
                "cancelled (a queued task is dropped when delivered; a running one stops within seconds)"
            }
            Outcome::AlreadyCompleted => "already completed; nothing changed",
            Outcome::AlreadyDead => "already dead; nothing changed (see `producer dead show`)",
            Outcome::AlreadyCancelled => "already cancelled; nothing changed",
            Outcome::CompletedFirst => {
                "completed before the cancel took effect; its result stands, nothing changed"
            }
        }
    }
}

/// `producer cancel`.
pub async fn run(settings: &shared::settings::Settings, args: CancelArgs) -> Result<(), Failure> {
    let job_id = crate::parse_job_id(&args.job_id)?;
    let storage = status::open_storage(settings)?;
    let broker = Broker::connect(settings).await?;
    let before = status::job_status(&storage, &broker, job_id)
        .await
        .infra()?;
    status::known_job(&storage, &broker, job_id, &before).await?;
    let mut results: Vec<(&'static str, Outcome)> = Vec::new();
    for (task, state) in before {
        if args.task.as_deref().is_some_and(|t| t != task) {
            continue;
        }
        let result = match state {
            TaskStatus::Completed { .. } => Outcome::AlreadyCompleted,
            TaskStatus::Dead(_) => Outcome::AlreadyDead,
            TaskStatus::Cancelled { .. } => Outcome::AlreadyCancelled,
            TaskStatus::Pending { .. } => mark(&storage, job_id, task).await?,
        };
        results.push((task, result));
    }
    if results.iter().any(|(_, r)| *r == Outcome::Cancelled) {
        stop_running(&broker, job_id, args.task.as_deref()).await;
        settle_race(&storage, job_id, &mut results).await?;
    }
    report(job_id, &results, args.json);
    if results.iter().any(|(_, r)| *r == Outcome::Cancelled) {
        Ok(())
    } else {
        Err(Failure::JobsFailed(format!(
            "nothing to cancel: job {job_id} has no unfinished task{}; nothing was changed",
            args.task
                .as_deref()
                .map(|t| format!(" `{t}`"))
                .unwrap_or_default()
        )))
    }
}

/// Writes `task`'s marker.
async fn mark(storage: &Storage, job_id: Uuid, task: &str) -> Result<Outcome, Failure> {
    let marker = CancelMarker {
        job_id,
        task: task.to_owned(),
        requested_at: shared::events::now_rfc3339(),
        requested_by: requested_by(),
    };
    let created = cancel::write_marker(storage, &marker)
        .await
        .map_err(|e| Failure::Infra(e.context(format!("writing the cancel marker of {task}"))))?;
    Ok(if created {
        Outcome::Cancelled
    } else {
        Outcome::AlreadyCancelled
    })
}

/// `user@host`, for the marker.
fn requested_by() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{user}@{host}")
}

/// Publishes the control message that stops running deliveries. Best effort: the
/// markers are the record, and a worker that misses this message still drops the task at
/// its next delivery; only a running one would then run to its end (and its result,
/// committed, wins).
async fn stop_running(broker: &Broker, job_id: Uuid, task: Option<&str>) {
    let request = CancelRequest {
        schema: shared::messages::SCHEMA_VERSION,
        job_id,
        task: task.map(str::to_owned),
    };
    let body = serde_json::to_vec(&request).expect("a cancel request serialises");
    let sent = async {
        let channel = broker.channel().await?;
        channel
            .basic_publish(
                broker.topology.events_exchange().into(),
                cancel::control_routing_key(job_id).into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await?
            .await?;
        let _ = channel.close(200, "cancel sent".into()).await;
        anyhow::Ok(())
    };
    if let Err(e) = sent.await {
        eprintln!(
            "producer: warning: could not tell running workers to stop ({e:#}); queued \
             deliveries are still dropped, a running one may run to its end"
        );
    }
}

/// Step 4: a task whose manifest appeared after our first look completed first.
async fn settle_race(
    storage: &Storage,
    job_id: Uuid,
    results: &mut [(&'static str, Outcome)],
) -> Result<(), Failure> {
    for (task, result) in results.iter_mut() {
        if *result != Outcome::Cancelled {
            continue;
        }
        let prefix = StorageKey::output_prefix(job_id, task).expect("a uuid makes a valid key");
        if storage.is_committed(&prefix).await.infra()? {
            let marker = cancel::marker_key(job_id, task).infra()?;
            storage.delete(&marker).await.infra()?;
            *result = Outcome::CompletedFirst;
        }
    }
    Ok(())
}

/// One line per task (or one JSON object with `--json`).
fn report(job_id: Uuid, results: &[(&'static str, Outcome)], json: bool) {
    if json {
        let tasks: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(t, r)| ((*t).to_owned(), serde_json::to_value(r).expect("JSON")))
            .collect();
        crate::say!(
            "{}",
            serde_json::json!({ "job_id": job_id, "tasks": tasks })
        );
        return;
    }
    crate::say!("job {job_id}");
    for (task, result) in results {
        crate::say!("  {task:<10} {}", result.describe());
    }
}
