//! Job events on the `video_events` topic exchange, routed `job.<job_id>.<task>.<state>`.
//!
//! Events are for live progress (`producer upload --wait`, dashboards): transient, not
//! confirmed, and losing one never loses a job — the manifests and the dead-letter queue
//! are the record of truth.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::split::PartRef;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Started,
    Progress,
    Completed,
    /// Failed this attempt (a `retrying` or `dead` follows).
    Failed,
    Retrying,
    Dead,
    /// Cancelled by an operator (`producer cancel`): terminal, like completed and dead.
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Started => "started",
            JobState::Progress => "progress",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Retrying => "retrying",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
    /// Completed, dead and cancelled end a task; nothing follows them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Dead | JobState::Cancelled
        )
    }
}

/// One event's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: Uuid,
    pub task: String,
    pub state: JobState,
    pub attempt: u32,
    pub worker: String,
    /// RFC 3339 time the event was sent.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Why it failed, or what it produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a part of a split task (a segment of a long transcode): which one. Its
    /// `percent` is the part's own; `completed` is never sent for a part, only for the
    /// task, once, when its parts are joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartRef>,
}

/// `job.<job_id>.<task>.<state>`.
pub fn routing_key(job_id: Uuid, task: &str, state: JobState) -> String {
    format!("job.{job_id}.{task}.{}", state.as_str())
}

/// Current time as RFC 3339, for events and dead-letter headers.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Sends events on its own channel (no confirms: events are best effort), from one
/// background task fed by a queue, so a job never waits on an event publish and events
/// of one worker keep their order.
#[derive(Clone)]
pub struct EventPublisher {
    queue: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>,
    worker: String,
    /// The sending task, for [`EventPublisher::finish`] to wait on.
    sender: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// Told of every progress event (the worker's in-flight map keeps the last percent
    /// for its heartbeats).
    progress_seen: Option<crate::inflight::InFlight>,
}

impl EventPublisher {
    /// Starts the sending task; it ends when the last clone of the publisher is dropped,
    /// after sending what was queued, and then closes its channel.
    pub fn new(channel: Channel, exchange: String, worker: String) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let sender = tokio::spawn(async move {
            let mut queued = Vec::with_capacity(EVENTS_AT_ONCE);
            while rx.recv_many(&mut queued, EVENTS_AT_ONCE).await > 0 {
                send_in_order(&channel, &exchange, queued.drain(..)).await;
            }
            let _ = channel.close(200, "events done".into()).await;
        });
        Self {
            queue,
            worker,
            sender: Arc::new(Mutex::new(Some(sender))),
            progress_seen: None,
        }
    }

    /// Also records every progress this publisher sends in `in_flight`.
    pub fn with_progress_to(mut self, in_flight: crate::inflight::InFlight) -> Self {
        self.progress_seen = Some(in_flight);
        self
    }

    /// Queues any body under any routing key (worker announcements).
    pub fn send(&self, routing_key: String, body: Vec<u8>) {
        let _ = self.queue.send((routing_key, body));
    }

    /// Sends every event queued so far and closes the channel, waiting at most `limit`
    /// (the sending task only ends once every clone is gone). For a clean shutdown: the
    /// last `completed` of a job finished during the drain still reaches `--wait`.
    pub async fn finish(self, limit: Duration) {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self);
        if let Some(sender) = sender
            && tokio::time::timeout(limit, sender).await.is_err()
        {
            tracing::debug!("job events still queued at shutdown were not sent");
        }
    }

    /// Queues one event for sending.
    #[allow(clippy::too_many_arguments)]
    pub fn emit(
        &self,
        job_id: Uuid,
        task: &str,
        part: Option<&PartRef>,
        state: JobState,
        attempt: u32,
        percent: Option<f64>,
        detail: Option<String>,
    ) {
        if let (Some(seen), JobState::Progress, Some(p)) = (&self.progress_seen, state, percent) {
            seen.progress(job_id, task, part, p);
        }
        let event = JobEvent {
            part: part.cloned(),
            job_id,
            task: task.to_owned(),
            state,
            attempt,
            worker: self.worker.clone(),
            at: now_rfc3339(),
            percent,
            detail,
        };
        let body = serde_json::to_vec(&event).expect("events always serialise");
        // The receiver only goes away with the session; then events are moot.
        let _ = self.queue.send((routing_key(job_id, task, state), body));
    }
}

/// How many queued events [`EventPublisher`]'s task sends at once, at most.
const EVENTS_AT_ONCE: usize = 64;

/// Publishes `events` on `channel`, all at once, in their order, and waits until each is
/// written. A publish queues its frames when first polled, so polling each once, in
/// order, keeps the order on the wire; the waits then overlap, and a busy worker's events
/// go out several per write instead of one per round trip to the connection's I/O loop.
async fn send_in_order(
    channel: &Channel,
    exchange: &str,
    events: impl Iterator<Item = (String, Vec<u8>)>,
) {
    let report = |sent: lapin::Result<_>| {
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not send a job event");
        }
    };
    let mut writing = futures::stream::FuturesUnordered::new();
    for (routing_key, body) in events {
        let mut publish = Box::pin(async move {
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await
        });
        match futures::poll!(&mut publish) {
            std::task::Poll::Ready(sent) => report(sent),
            std::task::Poll::Pending => writing.push(publish),
        }
    }
    while let Some(sent) = writing.next().await {
        report(sent);
    }
}

/// A private subscription to events: a server-named queue, exclusive to this connection
/// and deleted with it, bound to `exchange` with each routing key pattern of `keys`
/// (`job.<id>.#`, `job.*.thumbnail.completed`), consumed without acks (events are best
/// effort). Subscribe before publishing the jobs to follow: events sent before the
/// binding exists reach nobody. The channel must be kept as long as the consumer.
pub async fn subscribe(
    conn: &Connection,
    exchange: &str,
    keys: &[String],
    consumer_tag: &str,
) -> anyhow::Result<(Channel, Consumer)> {
    subscribe_with(conn, exchange, keys, consumer_tag, FieldTable::default()).await
}

/// [`subscribe`] with arguments for the private queue (a worker's control queue bounds
/// its length, see `cancel::listen`).
pub async fn subscribe_with(
    conn: &Connection,
    exchange: &str,
    keys: &[String],
    consumer_tag: &str,
    queue_args: FieldTable,
) -> anyhow::Result<(Channel, Consumer)> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            queue_args,
        )
        .await
        .context("declaring an event queue")?;
    for key in keys {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding to `{exchange}` with `{key}`"))?;
    }
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            consumer_tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consuming events")?;
    Ok((channel, consumer))
}
