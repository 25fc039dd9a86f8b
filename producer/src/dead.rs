//! `producer dead list | show | replay | purge`: the parking lot (`video_tasks.dead`).
//!
//! Looking never loses anything: a [`Scan`] takes every ready message with `basic.get`
//! *without* acking, and puts back whatever it did not deal with (`nack` + requeue) at
//! the end; if the process dies first, the broker requeues them when the channel
//! closes. A replay publishes the copy to `video_tasks` with a confirm *before* acking
//! the parked one, so a crash in between duplicates a job at worst.
//!
//! Why a message died comes from our `x-vidpipe-*` headers (worker dead letters) or
//! from the broker's `x-death` (delivery-limit overflows). A message parked with its body
//! cut to the message limit (it was oversize, see `x-vidpipe-truncated-from`) is shown as
//! such and never replayed: what is left of it is not the job that was sent.

use std::collections::BTreeMap;

use anyhow::Context;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use shared::runtime::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, FAILED_AT_HEADER, LAST_ERROR_HEADER, REASON_HEADER,
    TASK_HEADER, TRUNCATED_FROM_HEADER, WORKER_HEADER, header_str, header_u32,
};
use shared::settings::Settings;
use uuid::Uuid;

use crate::cli::DeadCommand;
use crate::exit::Failure;
use crate::publisher::{Broker, Outgoing};

/// Headers that describe a death (and the broker's redelivery count); a replayed message
/// starts without them.
const DEATH_HEADERS: [&str; 14] = [
    "x-delivery-count",
    REASON_HEADER,
    ATTEMPTS_HEADER,
    WORKER_HEADER,
    FAILED_AT_HEADER,
    TASK_HEADER,
    LAST_ERROR_HEADER,
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

/// What one parked message says about itself.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadInfo {
    /// From the body; `None` when the body is not a job (poison).
    pub job_id: Option<Uuid>,
    /// The task it was for, and the routing key a replay uses.
    pub task: Option<String>,
    pub reason: String,
    pub attempts: Option<u32>,
    pub worker: Option<String>,
    pub failed_at: Option<String>,
    /// `worker` (parked by a vidpipe worker) or `broker` (dead-lettered by RabbitMQ,
    /// e.g. the delivery limit of a crash-looping job).
    pub parked_by: &'static str,
    /// Bytes of the body as parked.
    pub bytes: usize,
    /// Set when the worker parked only the first `bytes` of an oversize body: its
    /// original size.
    pub truncated_from: Option<u64>,
}

/// Reads a parked message's headers and body.
pub fn describe(delivery: &Delivery) -> DeadInfo {
    let headers = delivery.properties.headers().as_ref();
    let body: Option<serde_json::Value> = serde_json::from_slice(&delivery.data).ok();
    let body_str = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k)?.as_str().map(str::to_owned))
    };
    let job_id = body_str("job_id").and_then(|s| s.parse().ok());
    let death = first_x_death(headers);
    let death_str = |k: &str| match death.and_then(|d| d.inner().get(k)) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    let death_routing_key = match death.and_then(|d| d.inner().get("routing-keys")) {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }),
        _ => None,
    };
    let task = header_str(headers, TASK_HEADER)
        .or(death_routing_key)
        .or_else(|| body_str("task"))
        .or_else(|| Some(delivery.routing_key.as_str().to_owned()).filter(|k| !k.is_empty()));
    let (reason, parked_by) = match header_str(headers, REASON_HEADER) {
        Some(reason) => (reason, "worker"),
        None => match death_str("reason") {
            Some(why) => {
                let queue = death_str("queue").unwrap_or_else(|| "?".into());
                let explained = match why.as_str() {
                    "delivery_limit" => {
                        "delivery limit reached (the job crashed or stalled its workers every time)"
                    }
                    "rejected" => "rejected by a consumer",
                    "expired" => "expired",
                    "maxlen" => "queue length limit",
                    _ => "",
                };
                (
                    format!("broker dead-lettered it from `{queue}`: {why} {explained}")
                        .trim_end()
                        .to_owned(),
                    "broker",
                )
            }
            None => ("(no reason recorded)".into(), "unknown"),
        },
    };
    let attempts = header_u32(headers, ATTEMPTS_HEADER).or_else(|| {
        death
            .and_then(|d| d.inner().get("count"))
            .and_then(|c| match c {
                AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
                _ => None,
            })
    });
    let failed_at = header_str(headers, FAILED_AT_HEADER).or_else(|| {
        match death.and_then(|d| d.inner().get("time")) {
            Some(AMQPValue::Timestamp(t)) => Some(format!("unix {t}")),
            _ => None,
        }
    });
    DeadInfo {
        job_id,
        task,
        reason,
        attempts,
        worker: header_str(headers, WORKER_HEADER),
        failed_at,
        parked_by,
        bytes: delivery.data.len(),
        truncated_from: header_u32(headers, TRUNCATED_FROM_HEADER).map(u64::from),
    }
}

/// The most recent `x-death` entry (RabbitMQ puts it first).
fn first_x_death(headers: Option<&FieldTable>) -> Option<&FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

/// The message a replay publishes: same body and properties, original routing key,
/// attempt 1, no death headers.
pub fn replay_message(
    delivery: &Delivery,
    info: &DeadInfo,
    tasks_exchange: &str,
) -> Option<Outgoing> {
    let task = info.task.clone()?;
    let mut headers = FieldTable::default();
    if let Some(old) = delivery.properties.headers() {
        for (k, v) in old.inner() {
            if !DEATH_HEADERS.contains(&k.as_str()) && k.as_str() != ATTEMPT_HEADER {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongInt(1));
    Some(Outgoing {
        exchange: tasks_exchange.to_owned(),
        routing_key: task,
        body: delivery.data.clone(),
        properties: delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2),
    })
}

/// Every ready message of the parking lot, held unacked until [`Scan::release`].
pub struct Scan {
    channel: Channel,
    pub parked: Vec<(Delivery, DeadInfo)>,
    /// Delivery tags already acked (replayed).
    done: Vec<u64>,
}

impl Scan {
    /// Takes every ready message of `queue` without acking it.
    pub async fn take(broker: &Broker) -> anyhow::Result<Self> {
        let queue = broker.topology.dead();
        let channel = broker.channel().await?;
        let mut parked = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading `{queue}`"))?
        {
            let info = describe(&message.delivery);
            parked.push((message.delivery, info));
        }
        Ok(Self {
            channel,
            parked,
            done: Vec::new(),
        })
    }

    /// Acks (removes) one parked message, after its replay was confirmed.
    pub async fn ack(&mut self, index: usize) -> anyhow::Result<()> {
        let delivery = &self.parked[index].0;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .context("acking the parked copy")?;
        self.done.push(delivery.delivery_tag);
        Ok(())
    }

    /// Puts back every message not acked.
    pub async fn release(self) -> anyhow::Result<()> {
        for (delivery, _) in &self.parked {
            if !self.done.contains(&delivery.delivery_tag) {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .context("returning a parked message to its queue")?;
            }
        }
        let _ = self.channel.close(200, "scan done".into()).await;
        Ok(())
    }
}

/// Parked messages of one job, without taking them out.
pub async fn of_job(broker: &Broker, job_id: Uuid) -> anyhow::Result<Vec<DeadInfo>> {
    let scan = Scan::take(broker).await?;
    let found = scan
        .parked
        .iter()
        .filter(|(_, i)| i.job_id == Some(job_id))
        .map(|(_, i)| i.clone())
        .collect();
    scan.release().await?;
    Ok(found)
}

/// `producer dead …`.
pub async fn run(settings: &Settings, command: DeadCommand) -> Result<(), Failure> {
    if let DeadCommand::Purge { yes: false } = command {
        return Err(Failure::usage(
            "refusing to purge the dead-letter queue without --yes: it deletes every parked job \
             for good. Look first with `producer dead list`, then run `producer dead purge --yes`",
        ));
    }
    let broker = Broker::connect(settings).await?;
    let infra = Failure::Infra;
    match command {
        DeadCommand::List { json } => {
            let scan = Scan::take(&broker).await.map_err(infra)?;
            let infos: Vec<DeadInfo> = scan.parked.iter().map(|(_, i)| i.clone()).collect();
            scan.release().await.map_err(infra)?;
            print_list(&broker.topology.dead(), &infos, json);
            Ok(())
        }
        DeadCommand::Show { job_id, json } => {
            let job_id = crate::parse_job_id(&job_id)?;
            let scan = Scan::take(&broker).await.map_err(infra)?;
            let mut shown = 0;
            for (delivery, info) in scan.parked.iter().filter(|(_, i)| i.job_id == Some(job_id)) {
                shown += 1;
                let headers = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(headers_json)
                    .unwrap_or_default();
                let body = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&delivery.data).into());
                let full = serde_json::json!({ "info": info, "routing_key": delivery.routing_key.as_str(), "headers": headers, "body": body });
                if json {
                    crate::say!("{full}");
                } else {
                    crate::say!(
                        "{}",
                        serde_json::to_string_pretty(&full).expect("JSON always prints")
                    );
                }
            }
            scan.release().await.map_err(infra)?;
            if shown == 0 {
                return Err(Failure::JobsFailed(format!(
                    "no parked message of job {job_id} in `{}`",
                    broker.topology.dead()
                )));
            }
            Ok(())
        }
        DeadCommand::Replay { job_id, all } => {
            let job_id = match (job_id, all) {
                (_, true) => None,
                (Some(id), false) => Some(crate::parse_job_id(&id)?),
                (None, false) => return Err(Failure::usage("give a JOB_ID or --all")),
            };
            replay(&broker, job_id).await
        }
        DeadCommand::Purge { .. } => {
            let channel = broker.channel().await.map_err(infra)?;
            let queue = broker.topology.dead();
            let purged = channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .with_context(|| format!("purging `{queue}`"))
                .map_err(infra)?;
            let _ = channel.close(200, "purged".into()).await;
            crate::say!("purged {purged} message(s) from `{queue}`");
            Ok(())
        }
    }
}

/// Replays the parked messages of `job_id` (all with `None`).
async fn replay(broker: &Broker, job_id: Option<Uuid>) -> Result<(), Failure> {
    let mut scan = Scan::take(broker).await.map_err(Failure::Infra)?;
    let exchange = broker.topology.tasks_exchange();
    let (mut replayed, mut failed) = (0, 0);
    for i in 0..scan.parked.len() {
        let (delivery, info) = &scan.parked[i];
        if job_id.is_some() && info.job_id != job_id {
            continue;
        }
        let shown = info
            .job_id
            .map(|id| id.to_string())
            .unwrap_or_else(|| "(no job id)".into());
        if let Some(original) = info.truncated_from {
            failed += 1;
            eprintln!(
                "producer: {shown}: only the first {} of its {original} bytes were kept when it \
                 was parked (it was over the message limit); it cannot be replayed, left parked",
                info.bytes
            );
            continue;
        }
        let Some(message) = replay_message(delivery, info, &exchange) else {
            failed += 1;
            eprintln!("producer: {shown}: no task to route it by; left parked");
            continue;
        };
        let task = message.routing_key.clone();
        match broker.publish_all(std::slice::from_ref(&message)).await {
            Ok(()) => match scan.ack(i).await {
                Ok(()) => {
                    replayed += 1;
                    crate::say!("replayed {shown} {task}");
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("producer: {shown} {task}: replayed, but {e:#}; it may run twice");
                }
            },
            Err(e) => {
                failed += 1;
                eprintln!("producer: {shown} {task}: {e:#}; left parked");
            }
        }
    }
    scan.release().await.map_err(Failure::Infra)?;
    if failed > 0 {
        return Err(Failure::Infra(anyhow::anyhow!(
            "{failed} message(s) could not be replayed (see above); {replayed} replayed"
        )));
    }
    if replayed == 0 {
        return match job_id {
            Some(id) => Err(Failure::JobsFailed(format!(
                "no parked message of job {id} in `{}`",
                broker.topology.dead()
            ))),
            None => {
                crate::say!("nothing to replay: `{}` is empty", broker.topology.dead());
                Ok(())
            }
        };
    }
    eprintln!(
        "producer: {replayed} message(s) sent back to `{exchange}` with the attempt count reset"
    );
    Ok(())
}

fn print_list(queue: &str, infos: &[DeadInfo], json: bool) {
    if json {
        for info in infos {
            crate::say!(
                "{}",
                serde_json::to_string(info).expect("JSON always prints")
            );
        }
        return;
    }
    if infos.is_empty() {
        crate::say!("`{queue}` is empty");
        return;
    }
    crate::say!(
        "{:<36}  {:<9}  {:>8}  {:<20}  {:<25}  REASON",
        "JOB ID",
        "TASK",
        "ATTEMPTS",
        "WORKER",
        "FAILED AT"
    );
    for i in infos {
        // The note goes first so the 100-character cut never hides it.
        let note = i
            .truncated_from
            .map(|original| format!("[body truncated: {} of {original} bytes kept] ", i.bytes))
            .unwrap_or_default();
        let reason: String = format!("{note}{}", i.reason).chars().take(100).collect();
        crate::say!(
            "{:<36}  {:<9}  {:>8}  {:<20}  {:<25}  {reason}",
            i.job_id
                .map(|j| j.to_string())
                .unwrap_or_else(|| "(not a job)".into()),
            i.task.as_deref().unwrap_or("?"),
            i.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into()),
            i.worker.as_deref().unwrap_or("-"),
            i.failed_at.as_deref().unwrap_or("-"),
        );
    }
    crate::say!("{} parked message(s) in `{queue}`", infos.len());
}

/// Headers as JSON, for `dead show`.
pub fn headers_json(table: &FieldTable) -> serde_json::Value {
    let map: BTreeMap<String, serde_json::Value> = table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
        .collect();
    serde_json::to_value(map).expect("JSON always serialises")
}

fn value_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::Float(f) => (*f).into(),
        AMQPValue::Double(f) => (*f).into(),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(t) => headers_json(t),
        other => format!("{other:?}").into(),
    }
}
