//! Cancelling a job (`producer cancel`): the marker that records it, and the control
//! message that stops it while it runs.
//!
//! **The record is a marker in storage**, `outputs/<job_id>/<task>/cancelled.json`, one
//! per task cancelled (a whole-job cancel writes one for each task kind), created with
//! create-if-absent like a manifest. It lives beside where the manifest would be, so
//! `status` finds both with the same listing, and it is keyed by job id and task, not by
//! a message's `output_prefix`: every part and the join of a split task share the job
//! id and the task, so they all honour the one marker. One key per task (rather than
//! one per job plus one per task) keeps the worker's check a single metadata call
//! beside its manifest check at delivery.
//!
//! **Precedence: a committed manifest wins.** A delivery that finds both a manifest and
//! a marker is a duplicate of a completed task; a handler that finished before it
//! noticed the cancel still commits. `producer cancel` writes the markers first, then
//! looks at the manifests again and reports any task that completed in between as
//! "already completed" (removing its now meaningless marker), so the operator is told
//! what happened in the race. A marker makes a task `cancelled` for good: it survives
//! restarts and redeliveries, and a later replay of a parked copy is dropped too.
//!
//! **The live stop is a control message** on `video_events` with routing key
//! `control.cancel.<job_id>`, outside the `job.#` space that `--wait` and dashboards bind
//! (so it is never read as a job state). Every worker session binds its own exclusive,
//! auto-delete queue to `control.cancel.*` ([`listen`]) and fires the token of every
//! matching in-flight delivery ([`InFlight::cancel`]); the codec loops watch that token,
//! so a running job stops within about a second. The runtime then sees the operator's
//! flag, acks without retry, emits `cancelled` and removes the scratch directory.
//!
//! Hostile control messages: the queue is bounded (length and bytes, oldest dropped);
//! a body over [`MAX_CONTROL_BYTES`], not JSON, of an unknown schema or naming no job is
//! logged (bounded) and ignored. The worst a forged one can do is what `producer cancel`
//! does, and whoever may publish to `video_events` may already forge job events; the
//! marker check at delivery does not trust the message at all.

use anyhow::Context as _;
use futures::StreamExt;
use lapin::Connection;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::inflight::InFlight;
use crate::messages::JobMessage;
use crate::split::Inputs;
use crate::storage::Storage;
use crate::storage_key::StorageKey;

/// Name of a task's cancel marker under its output prefix.
pub const MARKER: &str = "cancelled.json";

/// Routing key words of the control message: `control.cancel.<job_id>`.
pub const CONTROL_PREFIX: &str = "control.cancel";

/// Largest control message a worker reads; a real one is ~100 bytes.
pub const MAX_CONTROL_BYTES: usize = 4096;

/// What the marker records (for people: `status` shows who and when).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelMarker {
    pub job_id: Uuid,
    pub task: String,
    /// RFC 3339 time of the request.
    pub requested_at: String,
    /// `user@host` of the producer that asked.
    pub requested_by: String,
}

/// The control message: stop `job_id` (only its `task`, if given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub schema: u32,
    pub job_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Key of `task`'s cancel marker: `outputs/<job_id>/<task>/cancelled.json`.
pub fn marker_key(job_id: Uuid, task: &str) -> anyhow::Result<StorageKey> {
    Ok(StorageKey::output_prefix(job_id, task)?.join(MARKER)?)
}

/// Writes `task`'s marker unless there is one; true if this call wrote it.
pub async fn write_marker(storage: &Storage, marker: &CancelMarker) -> anyhow::Result<bool> {
    let key = marker_key(marker.job_id, &marker.task)?;
    let body = serde_json::to_vec(marker).context("encoding the cancel marker")?;
    storage.put_if_absent(&key, body).await
}

/// Whether `task` of `job_id` is cancelled: one metadata call (`HEAD` / `stat`).
pub async fn is_cancelled(storage: &Storage, job_id: Uuid, task: &str) -> anyhow::Result<bool> {
    storage.exists(&marker_key(job_id, task)?).await
}

/// The marker of `task`, if it is cancelled.
pub async fn marker(
    storage: &Storage,
    job_id: Uuid,
    task: &str,
) -> anyhow::Result<Option<CancelMarker>> {
    let key = marker_key(job_id, task)?;
    let Some(bytes) = storage.get_bytes(&key).await? else {
        return Ok(None);
    };
    // A marker is a marker even if a person wrote it by hand: its presence decides.
    Ok(Some(serde_json::from_slice(&bytes).unwrap_or(
        CancelMarker {
            job_id,
            task: task.to_owned(),
            requested_at: String::new(),
            requested_by: String::new(),
        },
    )))
}

/// The part prefixes of a split task that `job` belongs to (a part's siblings, a
/// join's inputs): what a cancelled part or join removes, so no committed segment of a
/// cancelled task is left behind. Empty for an unsplit job.
pub fn parts_of<J: JobMessage>(job: &J) -> Vec<StorageKey> {
    match (job.fan_in(), job.inputs()) {
        (Some(fan_in), _) => fan_in.awaits,
        (None, Inputs::Parts(parts)) => parts,
        (None, Inputs::Source) => Vec::new(),
    }
}

/// Removes the parts of a cancelled split task (best effort; what cannot be removed is
/// logged). A part still running elsewhere that commits later is removed by its own
/// cancelled join or stays as an unreferenced intermediate: never a visible output,
/// since no manifest of the task will name it.
pub async fn remove_parts(storage: &Storage, parts: &[StorageKey]) {
    for prefix in parts {
        storage.remove_prefix(prefix).await;
    }
}

/// `control.cancel.<job_id>`.
pub fn control_routing_key(job_id: Uuid) -> String {
    format!("{CONTROL_PREFIX}.{job_id}")
}

/// A control message's body as a request, or why it is refused.
pub fn parse_request(body: &[u8]) -> Result<CancelRequest, String> {
    if body.len() > MAX_CONTROL_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_CONTROL_BYTES}-byte limit",
            body.len()
        ));
    }
    let request: CancelRequest = serde_json::from_slice(body).map_err(|e| {
        let reason: String = e.to_string().chars().take(200).collect();
        format!("not a cancel request: {reason}")
    })?;
    if request.schema != crate::messages::SCHEMA_VERSION {
        return Err(format!("unknown schema {}", request.schema));
    }
    if request.job_id.is_nil() {
        return Err("the nil job id names no job".into());
    }
    Ok(request)
}

/// Binds this session's control queue and stops matching in-flight jobs until `stop`
/// fires or the connection goes (the session ends either way). Returns once bound, so
/// a cancel published after the worker is consuming is not missed.
pub async fn listen(
    conn: &Connection,
    exchange: &str,
    in_flight: InFlight,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    // Bounded against a flood of control messages: the oldest go first.
    args.insert("x-max-length".into(), AMQPValue::LongInt(1000));
    args.insert("x-max-length-bytes".into(), AMQPValue::LongInt(1 << 20));
    let keys = [format!("{CONTROL_PREFIX}.*")];
    let (channel, mut consumer) = crate::events::subscribe_with(conn, exchange, &keys, "", args)
        .await
        .context("listening for control messages")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => apply(&in_flight, &delivery.data),
                    _ => break,
                },
            }
        }
        let _ = channel.close(200, "session over".into()).await;
    });
    Ok(())
}

/// Carries out one control message (never fails: a bad one is logged and dropped).
fn apply(in_flight: &InFlight, body: &[u8]) {
    match parse_request(body) {
        Ok(request) => {
            let stopped = in_flight.cancel(request.job_id, request.task.as_deref());
            if stopped > 0 {
                tracing::info!(job_id = %request.job_id, task = request.task.as_deref().unwrap_or("all"), stopped, "operator cancelled a running job; stopping it");
            }
        }
        Err(reason) => tracing::warn!(%reason, "ignoring a control message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_control_messages_are_refused_without_panicking() {
        let id = Uuid::new_v4();
        let good = format!(r#"{{"schema":1,"job_id":"{id}","task":"transcode"}}"#);
        assert_eq!(
            parse_request(good.as_bytes()),
            Ok(CancelRequest {
                schema: 1,
                job_id: id,
                task: Some("transcode".into())
            })
        );
        let huge = vec![b'['; 10 * 1024 * 1024];
        for bad in [
            &b"not json"[..],
            b"",
            b"{}",
            br#"{"schema":1,"job_id":"nope"}"#,
            br#"{"schema":9,"job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e"}"#,
            br#"{"schema":1,"job_id":"00000000-0000-0000-0000-000000000000"}"#,
            huge.as_slice(),
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                &bad[..bad.len().min(40)]
            );
        }
        let deep = "[".repeat(3000);
        let err = parse_request(deep.as_bytes()).unwrap_err();
        assert!(err.len() < 300, "reasons are bounded: {err}");
    }

    #[test]
    fn markers_live_beside_the_manifest_of_their_task() {
        let id = Uuid::new_v4();
        assert_eq!(
            marker_key(id, "thumbnail").unwrap().as_str(),
            format!("outputs/{id}/thumbnail/cancelled.json")
        );
        assert!(!control_routing_key(id).starts_with("job."));
    }

    #[tokio::test]
    async fn the_first_marker_wins_and_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::from_settings(&crate::settings::StorageSettings {
            root: dir.path().to_path_buf(),
            ..Default::default()
        })
        .unwrap();
        let marker = CancelMarker {
            job_id: Uuid::new_v4(),
            task: "transcode".into(),
            requested_at: "2026-11-30T19:00:00Z".into(),
            requested_by: "ops@host".into(),
        };
        assert!(
            !is_cancelled(&storage, marker.job_id, "transcode")
                .await
                .unwrap()
        );
        assert!(write_marker(&storage, &marker).await.unwrap());
        assert!(!write_marker(&storage, &marker).await.unwrap());
        assert!(
            is_cancelled(&storage, marker.job_id, "transcode")
                .await
                .unwrap()
        );
        assert!(
            !is_cancelled(&storage, marker.job_id, "thumbnail")
                .await
                .unwrap()
        );
        assert_eq!(
            super::marker(&storage, marker.job_id, "transcode")
                .await
                .unwrap(),
            Some(marker)
        );
    }
}
