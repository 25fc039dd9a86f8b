//! Broker topology: every exchange and queue name, and their idempotent declaration.
//!
//! ```text
//! producer ──► video_tasks (direct) ──transcode──► video_tasks.transcode (quorum) ──► transcoder
//!                  ▲                └─thumbnail──► video_tasks.thumbnail (quorum) ──► thumbnailer
//!                  │ TTL expires, original routing key kept
//!   video_tasks.retry.quorum.<delay> (fanout exchange + quorum queue with x-message-ttl)
//!                  ▲ worker republishes a transient failure with x-vidpipe-attempt
//! video_tasks.dead (fanout exchange + quorum queue): poison, permanent, exhausted,
//!                  and the work queues' own dead letters (delivery limit overflow)
//! video_events (topic): job.<job_id>.<task>.<state>
//! ```
//!
//! One work queue per task kind of the topology's [`Registry`] (the builtin kinds, plus
//! the kind of the worker's own handler): the two above are `shared::tasks::BUILTIN`.
//! Each kind also has its high-priority queue `video_tasks.<task>.high` (routing key
//! `<task>.high`, same arguments), derived from the same registry: see
//! [`crate::priority`] for why priorities are a second queue.
//! Retry tiers are named after their delay (`video_tasks.retry.quorum.5s`), so changing
//! the configured delays declares new queues instead of clashing with existing arguments.
//! They are quorum queues, like the work queues and the parking lot, so a job waiting for
//! its retry survives the loss of a cluster node; their expired messages go back to
//! `video_tasks` at least once (`x-dead-letter-strategy = at-least-once`, which needs
//! `x-overflow = reject-publish`). Earlier versions declared classic tiers named
//! `video_tasks.retry.<delay>`: they still send what they hold back to `video_tasks`, and
//! may be deleted once empty.
//! Everything is declared by every process at start; declaring twice is a no-op.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::priority::Priority;
use crate::settings::Settings;
use crate::tasks::{Registry, TaskKind};

/// Names of everything on the broker, under an optional prefix, for the task kinds of a
/// [`Registry`] (one work queue each).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    prefix: String,
    retry_delays: Vec<Duration>,
    delivery_limit: u32,
    registry: Registry,
}

impl Topology {
    /// The topology of the builtin task kinds.
    pub fn new(prefix: &str, retry_delays: Vec<Duration>, delivery_limit: u32) -> Self {
        Self {
            prefix: prefix.to_owned(),
            retry_delays,
            delivery_limit,
            registry: Registry::builtin(),
        }
    }

    /// The topology of the builtin kinds from the settings' `topology` and `retry`
    /// sections: what every process declares.
    pub fn from_settings(settings: &Settings) -> Self {
        Self::new(
            &settings.topology.prefix,
            settings.retry.policy().delays,
            settings.retry.delivery_limit,
        )
    }

    /// This topology with `kind` added to its registry (a worker adds its own handler's
    /// kind, so a kind outside [`BUILTIN`](crate::tasks::BUILTIN) still gets its queue).
    pub fn with_kind(mut self, kind: TaskKind) -> Self {
        self.registry = self.registry.with(kind);
        self
    }

    /// The task kinds this topology has work queues for.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// `video_tasks`: where jobs are published, routed by task name.
    pub fn tasks_exchange(&self) -> String {
        self.name("video_tasks")
    }
    /// `video_tasks.<task>`: the work queue of one task.
    pub fn work_queue(&self, task: &str) -> String {
        self.name(&format!("video_tasks.{task}"))
    }
    /// `video_tasks.<task>` or `video_tasks.<task>.high`: the queue of one task's jobs of
    /// one priority (named after the routing key that leads to it).
    pub fn priority_queue(&self, task: &str, priority: Priority) -> String {
        self.work_queue(&priority.routing_key(task))
    }
    /// Every work queue of the registry, both priorities of each kind.
    pub fn work_queues(&self) -> Vec<String> {
        self.registry
            .names()
            .flat_map(|t| Priority::ALL.map(|p| self.priority_queue(t, p)))
            .collect()
    }
    /// `video_tasks.dead`: the parking lot (exchange and queue share the name).
    pub fn dead(&self) -> String {
        self.name("video_tasks.dead")
    }
    /// `video_events`: transient job events.
    pub fn events_exchange(&self) -> String {
        self.name("video_events")
    }
    /// Number of retry tiers.
    pub fn retry_tiers(&self) -> usize {
        self.retry_delays.len()
    }
    /// `video_tasks.retry.quorum.<delay>`: exchange and queue of retry tier `tier`.
    pub fn retry(&self, tier: usize) -> String {
        self.name(&format!(
            "video_tasks.retry.quorum.{}",
            delay_label(self.retry_delays[tier])
        ))
    }

    /// Declares everything. Idempotent; safe to call from every process at start.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        exchange(channel, &self.tasks_exchange(), ExchangeKind::Direct).await?;
        exchange(channel, &self.events_exchange(), ExchangeKind::Topic).await?;
        self.declare_parking_lot(channel).await?;
        for task in self.registry.names() {
            for priority in Priority::ALL {
                self.declare_work_queue(channel, &priority.routing_key(task))
                    .await?;
            }
        }
        for tier in 0..self.retry_tiers() {
            self.declare_retry_tier(channel, tier).await?;
        }
        Ok(())
    }

    /// The parking lot: a fanout exchange and the quorum queue bound to it.
    async fn declare_parking_lot(&self, channel: &Channel) -> lapin::Result<()> {
        let dead = self.dead();
        exchange(channel, &dead, ExchangeKind::Fanout).await?;
        queue(channel, &dead, [("x-queue-type", long_string("quorum"))]).await?;
        bind(channel, &dead, &dead, "").await
    }

    /// The work queue of routing key `key` (`<task>` or `<task>.high`): quorum
    /// (replicated, poison-safe), dead-lettering to the parking lot when the broker gives
    /// up (delivery limit), never silently dropping; bound to `video_tasks` by `key`.
    async fn declare_work_queue(&self, channel: &Channel, key: &str) -> lapin::Result<()> {
        let name = self.work_queue(key);
        let args = [
            ("x-queue-type", long_string("quorum")),
            ("x-dead-letter-exchange", long_string(&self.dead())),
            (
                "x-delivery-limit",
                AMQPValue::LongInt(self.delivery_limit as i32),
            ),
        ];
        queue(channel, &name, args).await?;
        bind(channel, &name, &self.tasks_exchange(), key).await
    }

    /// Retry tier `tier`: holds messages for its TTL, then dead-letters them back into
    /// `video_tasks` with the routing key they were published with (the task name). A
    /// quorum queue (replicated), dead-lettering at least once: a message is removed from
    /// the tier only once `video_tasks` confirmed it.
    async fn declare_retry_tier(&self, channel: &Channel, tier: usize) -> lapin::Result<()> {
        let name = self.retry(tier);
        let ttl_ms = self.retry_delays[tier].as_millis().min(i32::MAX as u128) as i32;
        exchange(channel, &name, ExchangeKind::Fanout).await?;
        let args = [
            ("x-queue-type", long_string("quorum")),
            ("x-message-ttl", AMQPValue::LongInt(ttl_ms)),
            ("x-dead-letter-strategy", long_string("at-least-once")),
            ("x-overflow", long_string("reject-publish")),
            (
                "x-dead-letter-exchange",
                long_string(&self.tasks_exchange()),
            ),
        ];
        queue(channel, &name, args).await?;
        bind(channel, &name, &name, "").await
    }

    /// Declares everything, or with `declare = false` (least-privilege users) only checks
    /// that `queue` exists, failing with what to do about it.
    pub async fn ensure(
        &self,
        channel: &Channel,
        declare: bool,
        queue: &str,
    ) -> anyhow::Result<()> {
        if declare {
            return Ok(self.declare(channel).await?);
        }
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel.queue_declare(queue.into(), passive, FieldTable::default()).await.map_err(|e| {
            anyhow::anyhow!(
                "queue `{queue}` is not there ({e}); with `topology.declare = false` an administrator \
                 must declare the topology first (e.g. `transcoder --declare-topology`)"
            )
        })?;
        Ok(())
    }

    /// Deletes everything [`declare`](Self::declare) made. For tests with a private
    /// prefix; never call it on a production prefix.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        let mut queues = self.work_queues();
        queues.push(self.dead());
        let mut exchanges = vec![self.tasks_exchange(), self.events_exchange(), self.dead()];
        for tier in 0..self.retry_tiers() {
            queues.push(self.retry(tier));
            exchanges.push(self.retry(tier));
        }
        for q in queues {
            channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        for e in exchanges {
            channel
                .exchange_delete(e.into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// Declares a durable exchange.
async fn exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await
}

/// Declares a durable queue with `args`.
async fn queue<const N: usize>(
    channel: &Channel,
    name: &str,
    args: [(&str, AMQPValue); N],
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut table = FieldTable::default();
    for (key, value) in args {
        table.insert(key.into(), value);
    }
    channel
        .queue_declare(name.into(), durable, table)
        .await
        .map(drop)
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            ShortString::from(key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// RabbitMQ wants string arguments as AMQP long strings (short strings are rejected).
fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// `5s`, `30s`, `5m`, `1500ms`: the shortest exact label for a delay.
pub fn delay_label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms > 0 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_exactly_the_design_names() {
        let t = Topology::new(
            "",
            vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(300),
            ],
            20,
        );
        assert_eq!(t.tasks_exchange(), "video_tasks");
        assert_eq!(t.work_queue("transcode"), "video_tasks.transcode");
        assert_eq!(t.work_queue("thumbnail"), "video_tasks.thumbnail");
        assert_eq!(
            t.work_queues(),
            [
                "video_tasks.transcode.high",
                "video_tasks.transcode",
                "video_tasks.thumbnail.high",
                "video_tasks.thumbnail"
            ]
        );
        assert_eq!(t.dead(), "video_tasks.dead");
        assert_eq!(t.events_exchange(), "video_events");
        assert_eq!(
            (0..3).map(|i| t.retry(i)).collect::<Vec<_>>(),
            [
                "video_tasks.retry.quorum.5s",
                "video_tasks.retry.quorum.30s",
                "video_tasks.retry.quorum.5m"
            ]
        );
    }

    #[test]
    fn prefix_applies_to_every_name() {
        let t = Topology::new("t1.", vec![Duration::from_millis(500)], 20);
        assert_eq!(t.work_queue("transcode"), "t1.video_tasks.transcode");
        assert_eq!(t.retry(0), "t1.video_tasks.retry.quorum.500ms");
    }
}
