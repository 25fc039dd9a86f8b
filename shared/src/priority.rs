//! Job priorities: `high` jobs start before the `normal` backlog, on any broker version.
//!
//! **Why two queues, not broker priorities.** Work queues are quorum queues (replicated,
//! poison-safe). RabbitMQ 3.10 quorum queues have no priorities at all; 4.x quorum queues
//! have two levels served in a fixed ratio (2:1), so a high job may still wait behind
//! normal ones; classic `x-max-priority` queues are not replicated. So each task kind has
//! a second work queue, `video_tasks.<task>.high` (routing key `<task>.high`), declared
//! with the same arguments as `video_tasks.<task>`. The priority travels as the routing
//! key: retries (the retry tiers dead-letter back with the key a message was published
//! with), dead letters (parked with it, replayed with it) and the parts of a split job
//! (published with their job's priority) all keep it.
//!
//! **The start gate.** A worker consumes both queues, each on its own channel (normal
//! prefetch = concurrency, high prefetch = concurrency + 1), but deliveries do not start
//! as they arrive: they wait in a [`StartGate`] until one of the worker's `concurrency`
//! job slots is free, and the gate picks a high delivery over every normal one that was
//! prefetched (the broker pushed those earlier, so without the gate a prefetched normal
//! job would start first). The one extra high prefetch keeps the high channel from being
//! full when a slot frees: with every slot busy on high jobs, the next high one is
//! already here, instead of still on its way while the slot goes to a normal delivery.
//!
//! **Normal jobs are never starved: at most [`HIGH_BURST`] high starts in a row while a
//! normal delivery waits in the gate; then the oldest waiting normal one starts.** So
//! under a steady stream of high jobs, normal work still gets at least one slot turn in
//! `HIGH_BURST + 1`. Within a priority, deliveries start in the order they arrived.
//!
//! Cost of the gate: a delivery may wait in the gate (unacked) for a slot, so a delivery's
//! age at its ack is up to a few job durations; the broker's `consumer_timeout` (1 h in
//! compose and Kubernetes) must stay above that, as for the per-job time limit.

use std::collections::VecDeque;

/// At most this many high starts in a row while a normal delivery waits (the
/// anti-starvation rule).
pub const HIGH_BURST: u32 = 4;

/// The routing key and queue suffix of high-priority jobs: `<task>.high`.
pub const HIGH_SUFFIX: &str = ".high";

/// A job's priority. `normal` unless the producer was asked for `high`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Both priorities, the high one first (the order a worker prefers them).
    pub const ALL: [Priority; 2] = [Priority::High, Priority::Normal];

    /// `high` or `normal`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// `task` for normal jobs, `task.high` for high ones: the key jobs are routed by, and
    /// the suffix of the queue they wait in.
    pub fn routing_key(self, task: &str) -> String {
        match self {
            Priority::Normal => task.to_owned(),
            Priority::High => format!("{task}{HIGH_SUFFIX}"),
        }
    }

    /// The priority a routing key (or a work queue name) says: high when it ends in
    /// `.high`. What a worker, a retry and a replay go by.
    pub fn of_routing_key(key: &str) -> Self {
        if key.ends_with(HIGH_SUFFIX) {
            Priority::High
        } else {
            Priority::Normal
        }
    }

    /// A routing key without its priority suffix: the task name.
    pub fn task_of(key: &str) -> &str {
        key.strip_suffix(HIGH_SUFFIX).unwrap_or(key)
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!("unknown priority `{other}`; known: high, normal")),
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deliveries waiting for a job slot, and the choice of which starts next. Pure: the
/// runtime pushes what its consumers yield and pops when a slot is free.
#[derive(Debug)]
pub struct StartGate<T> {
    high: VecDeque<T>,
    normal: VecDeque<T>,
    /// High starts in a row while normal deliveries were waiting.
    high_streak: u32,
}

impl<T> Default for StartGate<T> {
    fn default() -> Self {
        Self {
            high: VecDeque::new(),
            normal: VecDeque::new(),
            high_streak: 0,
        }
    }
}

impl<T> StartGate<T> {
    /// A delivery arrived.
    pub fn push(&mut self, priority: Priority, item: T) {
        match priority {
            Priority::High => self.high.push_back(item),
            Priority::Normal => self.normal.push_back(item),
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.high.is_empty() && self.normal.is_empty()
    }

    /// What should start in the slot that just became free: high first, except after
    /// [`HIGH_BURST`] high starts in a row while normal work waited.
    pub fn pop(&mut self) -> Option<(Priority, T)> {
        let normal_waits = !self.normal.is_empty();
        // The anti-starvation rule: a normal delivery is due after a burst of high starts.
        let normal_due = normal_waits && self.high_streak >= HIGH_BURST;
        let high_turn = !self.high.is_empty() && !normal_due;
        if high_turn {
            if normal_waits {
                self.high_streak += 1;
            }
            return self.high.pop_front().map(|d| (Priority::High, d));
        }
        self.high_streak = 0;
        self.normal.pop_front().map(|d| (Priority::Normal, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(gate: &mut StartGate<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| gate.pop().map(|(_, d)| d)).collect()
    }

    #[test]
    fn a_high_delivery_starts_before_normal_ones_that_came_first() {
        let mut gate = StartGate::default();
        for n in ["n1", "n2", "n3"] {
            gate.push(Priority::Normal, n);
        }
        gate.push(Priority::High, "h1");
        assert_eq!(order(&mut gate), ["h1", "n1", "n2", "n3"]);
    }

    /// The anti-starvation rule: after HIGH_BURST high starts in a row while normal work
    /// waits, one normal starts.
    #[test]
    fn normal_work_gets_a_turn_after_a_burst_of_high_starts() {
        let mut gate = StartGate::default();
        gate.push(Priority::Normal, "n1");
        gate.push(Priority::Normal, "n2");
        for h in ["h1", "h2", "h3", "h4", "h5", "h6"] {
            gate.push(Priority::High, h);
        }
        assert_eq!(
            order(&mut gate),
            ["h1", "h2", "h3", "h4", "n1", "h5", "h6", "n2"]
        );
    }

    /// High starts with nothing normal waiting do not count towards the burst.
    #[test]
    fn high_starts_without_normal_waiting_do_not_count() {
        let mut gate = StartGate::default();
        for _ in 0..10 {
            gate.push(Priority::High, "h");
            assert_eq!(gate.pop(), Some((Priority::High, "h")));
        }
        gate.push(Priority::Normal, "n");
        gate.push(Priority::High, "h");
        assert_eq!(gate.pop(), Some((Priority::High, "h")));
        assert_eq!(gate.pop(), Some((Priority::Normal, "n")));
        assert!(gate.is_empty() && gate.pop().is_none());
    }

    #[test]
    fn routing_keys_carry_the_priority() {
        assert_eq!(Priority::High.routing_key("transcode"), "transcode.high");
        assert_eq!(Priority::Normal.routing_key("transcode"), "transcode");
        assert_eq!(Priority::of_routing_key("transcode.high"), Priority::High);
        assert_eq!(
            Priority::of_routing_key("p.video_tasks.thumbnail.high"),
            Priority::High
        );
        assert_eq!(Priority::of_routing_key("transcode"), Priority::Normal);
        assert_eq!(Priority::task_of("transcode.high"), "transcode");
        assert_eq!("HIGH".parse::<Priority>(), Ok(Priority::High));
        assert!(
            "urgent"
                .parse::<Priority>()
                .unwrap_err()
                .contains("high, normal")
        );
    }
}
