//! `producer dead list | show | replay | purge`: the parking lot (`video_tasks.dead`).
//!
//! Looking never loses anything: a [`Scan`] takes every ready message with `basic.get`
//! *without* acking, and puts back whatever it did not deal with (`nack` + requeue) at
//! the end; if the process dies first, the broker requeues them when the channel
//! closes. A replay publishes the copy to `video_tasks` with a confirm *before* acking
//! the parked one, so a crash in between duplicates a job at worst.
//!
//! Why a message died comes from our `x-vidpipe-*` headers (worker dead letters) or
//! from the broker's `x-death` (delivery-limit overflows).
//!
//! Each parked message has its own short id ([`message_id`], a hash of its body and its
//! stable headers), so one message can be shown, replayed or purged by itself, even a
//! poison one that names no job. A message parked with its body
//! cut to the message limit (it was oversize, see `x-vidpipe-truncated-from`) is shown as
//! such and never replayed: what is left of it is not the job that was sent.

use std::collections::BTreeMap;

use anyhow::Context;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use shared::priority::Priority;
use shared::runtime::{
    ATTEMPT_HEADER, ATTEMPTS_HEADER, FAILED_AT_HEADER, LAST_ERROR_HEADER, REASON_HEADER,
    TASK_HEADER, TRUNCATED_FROM_HEADER, WORKER_HEADER, header_str, header_u32,
};
use shared::settings::Settings;
use shared::tasks;
use uuid::Uuid;

use crate::cli::DeadCommand;
use crate::exit::Failure;
use crate::publisher::{Broker, Outgoing};
use crate::upload::SOURCE_NAME_HEADER;

/// Headers the broker changes each time a message is looked at (returned with a nack):
/// left out of [`message_id`], so the id stays the same from one look to the next.
const VOLATILE_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// Reasons longer than this are cut (with `…`) in `dead list`, unless `--wide`.
const REASON_COLUMN: usize = 72;

/// File names longer than this are cut (with `…`) in `dead list`, unless `--wide`.
const FILE_COLUMN: usize = 24;

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
    /// The message's own id: [`message_id`], shown by `dead list`, taken by `dead show`,
    /// `replay` and `purge`.
    pub id: String,
    /// From the body; `None` when the body is not a job (poison).
    pub job_id: Option<Uuid>,
    /// The task it was for (without a priority suffix).
    pub task: Option<String>,
    /// `high` or `normal`: the routing key it was parked with (a worker's dead letter) or
    /// dead-lettered from (the broker's) says. A replay routes by task and priority.
    pub priority: Priority,
    pub reason: String,
    pub attempts: Option<u32>,
    pub worker: Option<String>,
    /// As recorded (RFC 3339; for a broker dead letter, the `x-death` time).
    pub failed_at: Option<String>,
    /// The uploaded file's name, from the producer's `x-vidpipe-source-name` header.
    pub file: Option<String>,
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
    let death_routing_key = match death.and_then(|d| d.inner().get("routing-keys")) {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }),
        _ => None,
    };
    let routing_key = delivery.routing_key.as_str();
    let priority = match &death_routing_key {
        Some(key) => Priority::of_routing_key(key),
        None => Priority::of_routing_key(routing_key),
    };
    let task = header_str(headers, TASK_HEADER)
        .or(death_routing_key)
        .or_else(|| body_str("task"))
        .or_else(|| Some(routing_key.to_owned()).filter(|k| !k.is_empty()))
        .map(|t| Priority::task_of(&t).to_owned());
    let (reason, parked_by) = parked_reason(headers, death);
    let attempts = header_u32(headers, ATTEMPTS_HEADER).or_else(|| death_count(death));
    let failed_at = header_str(headers, FAILED_AT_HEADER).or_else(|| death_time(death));
    DeadInfo {
        id: message_id(delivery),
        job_id,
        task,
        priority,
        reason,
        attempts,
        worker: header_str(headers, WORKER_HEADER),
        failed_at,
        file: header_str(headers, SOURCE_NAME_HEADER).map(|f| printable(&f)),
        parked_by,
        bytes: delivery.data.len(),
        truncated_from: header_u32(headers, TRUNCATED_FROM_HEADER).map(u64::from),
    }
}

/// A string field of the broker's `x-death` record.
fn death_str(death: Option<&FieldTable>, key: &str) -> Option<String> {
    match death?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Why a message is parked and who parked it: the worker's reason header, else the
/// broker's `x-death` reason, explained.
fn parked_reason(
    headers: Option<&FieldTable>,
    death: Option<&FieldTable>,
) -> (String, &'static str) {
    if let Some(reason) = header_str(headers, REASON_HEADER) {
        return (reason, "worker");
    }
    let Some(why) = death_str(death, "reason") else {
        return ("(no reason recorded)".into(), "unknown");
    };
    let queue = death_str(death, "queue").unwrap_or_else(|| "?".into());
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

/// How often the broker dead-lettered the message, from its `x-death` record.
fn death_count(death: Option<&FieldTable>) -> Option<u32> {
    match death?.inner().get("count")? {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// When the broker dead-lettered the message (RFC 3339), from its `x-death` record.
fn death_time(death: Option<&FieldTable>) -> Option<String> {
    match death?.inner().get("time")? {
        AMQPValue::Timestamp(t) => Some(
            i64::try_from(*t)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| format!("unix {t}")),
        ),
        _ => None,
    }
}

/// A parked message's own id: 12 hex digits of an FNV-1a hash of its body and headers
/// (in key order, without the ones the broker changes while it is parked). The same
/// message has the same id in every `dead list`; two messages share one only if they are
/// identical in every byte, and then acting on both is what anyone would want.
pub fn message_id(delivery: &Delivery) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(&delivery.data);
    if let Some(headers) = delivery.properties.headers() {
        let stable: BTreeMap<String, serde_json::Value> = headers
            .inner()
            .iter()
            .filter(|(k, _)| !VOLATILE_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
            .collect();
        feed(&serde_json::to_vec(&stable).expect("JSON always serialises"));
    }
    format!("{:012x}", hash >> 16)
}

/// What `dead show`, `replay` and `purge` act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Every parked message of a job.
    Job(Uuid),
    /// One parked message, by its [`message_id`].
    Message(String),
}

impl Target {
    /// A job id (UUID) or a message id (12 hex digits), as a usage error naming both
    /// forms when it is neither.
    pub fn parse(s: &str) -> Result<Self, Failure> {
        let s = s.trim();
        if let Ok(id) = s.parse() {
            return Ok(Self::Job(id));
        }
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Message(s.to_ascii_lowercase()));
        }
        Err(Failure::usage(format!(
            "`{s}` is neither a job id (a UUID as printed by `producer upload`) nor a parked \
             message's id (12 hex digits, the ID column of `producer dead list`)"
        )))
    }

    fn matches(&self, info: &DeadInfo) -> bool {
        match self {
            Self::Job(id) => info.job_id == Some(*id),
            Self::Message(id) => info.id == *id,
        }
    }

    fn nothing_found(&self, queue: &str) -> Failure {
        Failure::JobsFailed(match self {
            Self::Job(id) => format!("no parked message of job {id} in `{queue}`"),
            Self::Message(id) => format!(
                "no parked message with id {id} in `{queue}` (ids are in the ID column of \
                 `producer dead list`)"
            ),
        })
    }
}

/// `2026-11-30 13:35:24` from our RFC 3339 UTC times (any fraction dropped), so every row
/// has the same width and the rows sort by time; anything else as it is.
pub fn to_seconds(t: &str) -> String {
    let b = t.as_bytes();
    let shaped = b.len() >= 20
        && b.ends_with(b"Z")
        && b[..19].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        });
    if shaped {
        format!("{} {}", &t[..10], &t[11..19])
    } else {
        t.to_owned()
    }
}

/// [`to_seconds`] with ` UTC` when it is one of our times, for fields read on their own.
pub fn shown_time(t: &str) -> String {
    let short = to_seconds(t);
    if short == t {
        short
    } else {
        format!("{short} UTC")
    }
}

/// Control characters (a file name or a reason may hold any) as `?`, so a row stays a row.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `s` cut to `max` characters, the cut marked with `…`.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Oldest first: the order they died in; the id keeps the order stable.
fn sort_by_time(infos: &mut [DeadInfo]) {
    infos.sort_by_cached_key(|i| {
        (
            i.failed_at.as_deref().map(to_seconds).unwrap_or_default(),
            i.id.clone(),
        )
    });
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

/// The message a replay publishes: same body and properties, original routing key (task
/// and priority), attempt 1, no death headers.
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
        routing_key: info.priority.routing_key(&task),
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
    check_usage(&command)?;
    let broker = Broker::connect(settings).await?;
    let infra = Failure::Infra;
    let queue = broker.topology.dead();
    match command {
        DeadCommand::List { json, wide } => {
            let scan = Scan::take(&broker).await.map_err(infra)?;
            let mut infos: Vec<DeadInfo> = scan.parked.iter().map(|(_, i)| i.clone()).collect();
            scan.release().await.map_err(infra)?;
            sort_by_time(&mut infos);
            print_list(&queue, &infos, json, wide);
            Ok(())
        }
        DeadCommand::Show { target, json } => show(&broker, &Target::parse(&target)?, json).await,
        DeadCommand::Replay { target, all } => {
            let target = match (target, all) {
                (_, true) => None,
                (Some(t), false) => Some(Target::parse(&t)?),
                (None, false) => {
                    return Err(Failure::usage("give a JOB_ID, a message ID or --all"));
                }
            };
            replay(&broker, target).await
        }
        DeadCommand::Purge { target: None, .. } => {
            let channel = broker.channel().await.map_err(infra)?;
            let purged = channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                .await
                .with_context(|| format!("purging `{queue}`"))
                .map_err(infra)?;
            let _ = channel.close(200, "purged".into()).await;
            crate::say!("purged {purged} message(s) from `{queue}`");
            Ok(())
        }
        DeadCommand::Purge {
            target: Some(target),
            ..
        } => purge(&broker, &Target::parse(&target)?).await,
    }
}

/// The usage errors of a `dead` command, found before anything connects.
fn check_usage(command: &DeadCommand) -> Result<(), Failure> {
    let target = |t: &Option<String>| t.as_deref().map(Target::parse).transpose();
    match &command {
        DeadCommand::Purge {
            yes: false,
            target: t,
        } => {
            let what = match target(t)? {
                Some(_) => format!("`{}` for good", t.as_deref().unwrap_or_default()),
                None => "every parked job for good".into(),
            };
            return Err(Failure::usage(format!(
                "refusing to purge without --yes: it deletes {what}. Look first with \
                 `producer dead list`, then add --yes"
            )));
        }
        DeadCommand::Show { target: t, .. } => drop(Target::parse(t)?),
        DeadCommand::Replay { target: t, .. } | DeadCommand::Purge { target: t, .. } => {
            drop(target(t)?)
        }
        DeadCommand::List { .. } => {}
    }
    Ok(())
}

/// `dead show TARGET`: each parked message it matches, oldest first.
async fn show(broker: &Broker, target: &Target, json: bool) -> Result<(), Failure> {
    let infra = Failure::Infra;
    let scan = Scan::take(broker).await.map_err(infra)?;
    let mut found: Vec<&(Delivery, DeadInfo)> = scan
        .parked
        .iter()
        .filter(|(_, i)| target.matches(i))
        .collect();
    found.sort_by_cached_key(|(_, i)| (i.failed_at.as_deref().map(to_seconds), i.id.clone()));
    for (n, (delivery, info)) in found.iter().enumerate() {
        if json {
            crate::say!("{}", show_json(delivery, info));
        } else {
            if n > 0 {
                crate::say!();
            }
            crate::say!("{}", show_text(delivery, info));
        }
    }
    let shown = found.len();
    scan.release().await.map_err(infra)?;
    if shown == 0 {
        return Err(target.nothing_found(&broker.topology.dead()));
    }
    Ok(())
}

/// `dead purge TARGET --yes`: removes the parked messages it matches, leaving the rest.
async fn purge(broker: &Broker, target: &Target) -> Result<(), Failure> {
    let infra = Failure::Infra;
    let queue = broker.topology.dead();
    let mut scan = Scan::take(broker).await.map_err(infra)?;
    let mut purged = 0;
    for i in 0..scan.parked.len() {
        if !target.matches(&scan.parked[i].1) {
            continue;
        }
        let id = scan.parked[i].1.id.clone();
        scan.ack(i).await.map_err(infra)?;
        purged += 1;
        crate::say!("purged {id}");
    }
    scan.release().await.map_err(infra)?;
    if purged == 0 {
        return Err(target.nothing_found(&queue));
    }
    crate::say!("purged {purged} message(s) from `{queue}`");
    Ok(())
}

/// `dead show --json`: what we make of it, and everything it carries.
fn show_json(delivery: &Delivery, info: &DeadInfo) -> serde_json::Value {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(headers_json)
        .unwrap_or_default();
    let body = serde_json::from_slice::<serde_json::Value>(&delivery.data)
        .unwrap_or_else(|_| String::from_utf8_lossy(&delivery.data).into());
    serde_json::json!({
        "info": info,
        "routing_key": delivery.routing_key.as_str(),
        "headers": headers,
        "body": body,
    })
}

/// Headers `dead show` already shows as fields.
const SHOWN_HEADERS: [&str; 8] = [
    REASON_HEADER,
    ATTEMPTS_HEADER,
    WORKER_HEADER,
    FAILED_AT_HEADER,
    TASK_HEADER,
    TRUNCATED_FROM_HEADER,
    SOURCE_NAME_HEADER,
    "x-death",
];

/// `dead show`: one field per line, the reason whole, the job's settings summarised,
/// then any other header.
fn show_text(delivery: &Delivery, info: &DeadInfo) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut field = |name: &str, value: String| lines.push((name.to_owned(), value));
    let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "(not recorded)".into());
    field(
        "job",
        info.job_id
            .map(|j| j.to_string())
            .unwrap_or_else(|| "(not a job: the body names no job id)".into()),
    );
    field("task", or_unknown(info.task.clone()));
    field("priority", info.priority.to_string());
    field("file", or_unknown(info.file.clone()));
    field(
        "failed at",
        or_unknown(info.failed_at.as_deref().map(shown_time)),
    );
    field("attempts", or_unknown(info.attempts.map(|a| a.to_string())));
    field("worker", or_unknown(info.worker.clone()));
    field("parked by", info.parked_by.to_owned());
    field("reason", printable(&info.reason));
    let headers = delivery.properties.headers().as_ref();
    if let Some(last) = header_str(headers, LAST_ERROR_HEADER) {
        field("last error", printable(&last));
    }
    let body: Option<serde_json::Value> = serde_json::from_slice(&delivery.data).ok();
    match info.truncated_from {
        Some(original) => field(
            "body",
            format!(
                "{} of its {original} bytes kept (it was over the message limit; it cannot be \
                 replayed)",
                info.bytes
            ),
        ),
        None => field("body", format!("{} bytes", info.bytes)),
    }
    match &body {
        Some(job) if job.is_object() => {
            if let Some(source) = job.get("source").and_then(|s| s.as_str()) {
                field("source", source.to_owned());
            }
            if let Some(prefix) = job.get("output_prefix").and_then(|s| s.as_str()) {
                field("outputs", prefix.to_owned());
            }
            for (n, line) in settings_summary(job).into_iter().enumerate() {
                field(if n == 0 { "settings" } else { "" }, line);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(&delivery.data);
            field("content", printable(&cut(&text, 200)));
        }
    }
    if let Some(table) = headers {
        let others = table.inner().iter().filter(|(k, _)| {
            !SHOWN_HEADERS.contains(&k.as_str()) && !VOLATILE_HEADERS.contains(&k.as_str())
        });
        for (n, (k, v)) in others.enumerate() {
            let value = match value_json(v) {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            field(
                if n == 0 { "headers" } else { "" },
                printable(&format!("{}: {value}", k.as_str())),
            );
        }
    }
    let width = lines
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("message {}", info.id);
    for (name, value) in lines {
        out.push_str(&format!("\n  {name:<width$}  {value}"));
    }
    out
}

/// The job's options in a few words, read from the body as JSON (it may not be a valid
/// job: it was parked for a reason).
fn settings_summary(job: &serde_json::Value) -> Vec<String> {
    let list = |key: &str| -> Option<Vec<String>> {
        Some(
            job.get(key)?
                .as_array()?
                .iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other
                        .get("name")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned)
                        .unwrap_or_else(|| other.to_string()),
                })
                .collect(),
        )
    };
    let number = |key: &str| job.get(key).and_then(|v| v.as_f64());
    match job.get("task").and_then(|t| t.as_str()) {
        Some(t) if t == tasks::TRANSCODE.name => {
            let renditions = match list("renditions") {
                Some(r) if !r.is_empty() => format!("renditions {}", r.join(", ")),
                _ => "default ladder (derived from the source)".into(),
            };
            let formats = list("formats")
                .map(|f| f.join(", "))
                .unwrap_or_else(|| "mp4, hls (default)".into());
            let codecs = list("codecs")
                .map(|c| c.join(", "))
                .unwrap_or_else(|| "h264 (default)".into());
            vec![format!("{renditions}; formats {formats}; codecs {codecs}")]
        }
        Some(t) if t == tasks::THUMBNAIL.name => {
            let poster = job.get("poster").and_then(|p| p.as_bool()).unwrap_or(true);
            let shots = match list("timestamps") {
                Some(t) if !t.is_empty() => format!("thumbnails at {} s", t.join(", ")),
                _ => format!("{} thumbnails", number("count").unwrap_or(10.0)),
            };
            let image = format!(
                "{} px {} q{}",
                number("width").unwrap_or(320.0),
                job.get("format").and_then(|f| f.as_str()).unwrap_or("jpeg"),
                number("quality").unwrap_or(85.0)
            );
            let sprite = match job.get("sprite") {
                Some(s) if s.is_object() => format!(
                    "sprite every {} s, {} columns, {} px tiles",
                    s.get("interval_s").and_then(|v| v.as_f64()).unwrap_or(0.0),
                    s.get("columns").and_then(|v| v.as_u64()).unwrap_or(0),
                    s.get("width").and_then(|v| v.as_u64()).unwrap_or(0)
                ),
                _ => "no sprite".into(),
            };
            vec![
                format!(
                    "{}{shots}, {image}",
                    if poster { "poster, " } else { "no poster, " }
                ),
                sprite,
            ]
        }
        _ => vec![format!("(unknown task: {})", cut(&job.to_string(), 120))],
    }
}

/// Replays the parked messages of `target` (all with `None`).
async fn replay(broker: &Broker, target: Option<Target>) -> Result<(), Failure> {
    let mut scan = Scan::take(broker).await.map_err(Failure::Infra)?;
    let exchange = broker.topology.tasks_exchange();
    let (mut replayed, mut failed) = (0, 0);
    for i in 0..scan.parked.len() {
        let (delivery, info) = &scan.parked[i];
        if target.as_ref().is_some_and(|t| !t.matches(info)) {
            continue;
        }
        let shown = match info.job_id {
            Some(job) => format!("{} (job {job})", info.id),
            None => format!("{} (not a job)", info.id),
        };
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
        return match target {
            Some(t) => Err(t.nothing_found(&broker.topology.dead())),
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

fn print_list(queue: &str, infos: &[DeadInfo], json: bool, wide: bool) {
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
    let header = [
        "ID",
        "FAILED AT (UTC)",
        "JOB",
        "TASK",
        "TRIES",
        "WORKER",
        "FILE",
        "REASON",
    ];
    let mut reasons_cut = false;
    let rows: Vec<[String; 8]> = infos
        .iter()
        .map(|i| list_row(i, wide, &mut reasons_cut))
        .collect();
    print_table(header, &rows);
    crate::say!(
        "{} parked message(s) in `{queue}`, oldest first",
        infos.len()
    );
    if reasons_cut {
        crate::say!(
            "reasons longer than {REASON_COLUMN} characters are cut (…): `producer dead list \
             --wide` or `producer dead show ID` shows them whole"
        );
    }
}

/// One `dead list` row; a reason cut to fit sets `reasons_cut`.
fn list_row(i: &DeadInfo, wide: bool, reasons_cut: &mut bool) -> [String; 8] {
    // The note goes first so a cut reason never hides it.
    let note = i
        .truncated_from
        .map(|original| format!("[body truncated: {} of {original} bytes kept] ", i.bytes))
        .unwrap_or_default();
    let reason = printable(&format!("{note}{}", i.reason));
    let reason = if wide {
        reason
    } else {
        let shown = cut(&reason, REASON_COLUMN);
        *reasons_cut |= shown != reason;
        shown
    };
    let file = i.file.as_deref().unwrap_or("-");
    [
        i.id.clone(),
        i.failed_at
            .as_deref()
            .map(to_seconds)
            .unwrap_or_else(|| "-".into()),
        i.job_id
            .map(|j| j.to_string())
            .unwrap_or_else(|| "(not a job)".into()),
        i.task.clone().unwrap_or_else(|| "?".into()),
        i.attempts
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into()),
        printable(i.worker.as_deref().unwrap_or("-")),
        if wide {
            file.to_owned()
        } else {
            cut(file, FILE_COLUMN)
        },
        reason,
    ]
}

/// The `dead list` table: columns padded to their widest cell, TRIES right-aligned,
/// the reason last and unpadded.
fn print_table(header: [&str; 8], rows: &[[String; 8]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 8]| {
        let mut out = String::new();
        for (n, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            match n {
                7 => out.push_str(cell),
                // TRIES is a number: right-aligned.
                4 => out.push_str(&format!("{}{cell}  ", " ".repeat(pad))),
                _ => out.push_str(&format!("{cell}{}  ", " ".repeat(pad))),
            }
        }
        out
    };
    crate::say!("{}", line(header));
    for row in rows {
        crate::say!("{}", line(row.each_ref().map(String::as_str)));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_to_the_second_at_one_width() {
        assert_eq!(to_seconds("2026-11-30T03:04:05.5Z"), "2026-11-30 03:04:05");
        assert_eq!(
            to_seconds("2026-11-30T03:04:05.123456789Z"),
            "2026-11-30 03:04:05"
        );
        assert_eq!(to_seconds("2026-11-30T03:04:05Z"), "2026-11-30 03:04:05");
        // Not ours: shown as it came.
        assert_eq!(to_seconds("yesterday"), "yesterday");
    }

    #[test]
    fn a_cut_is_marked() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("0123456789abc", 10), "012345678…");
        assert_eq!(cut("0123456789abc", 10).chars().count(), 10);
        assert_eq!(printable("a\nb\tc"), "a?b?c");
    }

    #[test]
    fn targets_are_job_ids_or_message_ids() {
        let job = "6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e";
        assert_eq!(
            Target::parse(job).unwrap(),
            Target::Job(job.parse().unwrap())
        );
        assert_eq!(
            Target::parse("3F9A0C1B2D4E").unwrap(),
            Target::Message("3f9a0c1b2d4e".into())
        );
        for bad in ["3f9a0c1b2d4", "zzzzzzzzzzzz", "", "6f1c1f0e"] {
            assert!(
                matches!(Target::parse(bad), Err(Failure::Usage(_))),
                "{bad}"
            );
        }
    }
}
