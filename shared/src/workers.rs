//! The worker registry, without a database: every worker announces itself on
//! `video_events` (routing key `worker.<kind>.<state>`) when it starts consuming, every
//! `worker.heartbeat_secs` while it runs, and when it stops. `producer workers` binds a
//! private queue to `worker.#`, listens a little longer than one heartbeat period and
//! lists who it heard ([`Roster`]).
//!
//! Each announcement is a whole snapshot (id, host, kind, version, concurrency, the
//! in-flight jobs with their percent, uptime), so a listener needs no history: the last
//! one heard from a worker is its state. A worker that was heard but has been silent for
//! `worker.gone_after_secs` (say it was SIGKILLed, or lost the broker) is shown `gone`;
//! one that said `stopped` is shown stopped; one that is never heard again drops out of
//! the next listing. Announcements are best effort, like job events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::{EventPublisher, now_rfc3339};
use crate::inflight::{InFlight, RunningJob};

/// Routing keys of announcements start with this word.
pub const ROUTING_PREFIX: &str = "worker";

/// Where a worker is in its life, as it says itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    /// Consuming (sent at the start of every broker session).
    Started,
    /// Heartbeat.
    Alive,
    /// Shutting down cleanly: in-flight jobs are settled.
    Stopped,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Started => "started",
            Presence::Alive => "alive",
            Presence::Stopped => "stopped",
        }
    }
}

/// One announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The worker's name (`worker.name`, default `<host>-<pid>`).
    pub id: String,
    /// This process (a restarted worker of the same name is another instance).
    pub instance: Uuid,
    pub host: String,
    /// Task kind it consumes (`transcode`, `thumbnail`, …).
    pub kind: String,
    /// Crate version of the worker binary.
    pub version: String,
    pub concurrency: u16,
    pub state: Presence,
    pub in_flight: Vec<RunningJob>,
    pub uptime_s: f64,
    /// Its heartbeat period, so a listener knows how long silence may last.
    pub heartbeat_s: f64,
    /// RFC 3339 time it was sent.
    pub at: String,
}

/// `worker.<kind>.<state>`.
pub fn routing_key(kind: &str, state: Presence) -> String {
    format!("{ROUTING_PREFIX}.{kind}.{}", state.as_str())
}

/// What stays the same in every announcement of one worker process.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub instance: Uuid,
    pub host: String,
    pub kind: &'static str,
    pub version: &'static str,
    pub concurrency: u16,
    pub started: Instant,
    pub heartbeat: Duration,
}

impl Identity {
    /// This process as worker `id` of `kind`.
    pub fn new(id: String, kind: &'static str, concurrency: u16, heartbeat: Duration) -> Self {
        Self {
            id,
            instance: Uuid::new_v4(),
            host: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind,
            version: env!("CARGO_PKG_VERSION"),
            concurrency,
            started: Instant::now(),
            heartbeat,
        }
    }

    fn announcement(&self, state: Presence, in_flight: &InFlight) -> Announcement {
        Announcement {
            id: self.id.clone(),
            instance: self.instance,
            host: self.host.clone(),
            kind: self.kind.to_owned(),
            version: self.version.to_owned(),
            concurrency: self.concurrency,
            state,
            in_flight: in_flight.snapshot(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            heartbeat_s: self.heartbeat.as_secs_f64(),
            at: now_rfc3339(),
        }
    }

    /// Sends one announcement.
    pub fn announce(&self, events: &EventPublisher, state: Presence, in_flight: &InFlight) {
        let body = serde_json::to_vec(&self.announcement(state, in_flight))
            .expect("announcements always serialise");
        events.send(routing_key(self.kind, state), body);
    }
}

/// Announces `started` now, then `alive` every heartbeat period until `stop` fires. The
/// session sends `stopped` itself, after its jobs are settled.
pub fn spawn_heartbeat(
    identity: Identity,
    events: EventPublisher,
    in_flight: InFlight,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        identity.announce(&events, Presence::Started, &in_flight);
        let mut tick = tokio::time::interval(identity.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => identity.announce(&events, Presence::Alive, &in_flight),
            }
        }
    });
}

/// How a listed worker is doing, as the listener judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Heard within the gone-after timeout.
    Live,
    /// Said it stopped.
    Stopped,
    /// Silent for longer than the gone-after timeout.
    Gone,
}

/// What a listener heard, latest announcement per worker instance.
#[derive(Debug, Default)]
pub struct Roster {
    heard: BTreeMap<(String, Uuid), (Instant, Announcement)>,
}

/// One line of `producer workers`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub liveness: Liveness,
    pub last_heard_s: f64,
    #[serde(flatten)]
    pub announcement: Announcement,
}

impl Roster {
    /// Records an announcement body heard at `at`; a body that is not one is ignored.
    pub fn hear(&mut self, body: &[u8], at: Instant) {
        if body.len() > 1 << 20 {
            return;
        }
        if let Ok(a) = serde_json::from_slice::<Announcement>(body) {
            self.heard.insert((a.id.clone(), a.instance), (at, a));
        }
    }

    /// Every worker heard, by kind and id, judged at `now` with `gone_after`.
    pub fn list(&self, now: Instant, gone_after: Duration) -> Vec<Listed> {
        let mut out: Vec<Listed> = self
            .heard
            .values()
            .map(|(at, a)| {
                let silent = now.saturating_duration_since(*at);
                let liveness = match a.state {
                    Presence::Stopped => Liveness::Stopped,
                    _ if silent > gone_after => Liveness::Gone,
                    _ => Liveness::Live,
                };
                Listed {
                    liveness,
                    last_heard_s: silent.as_secs_f64(),
                    announcement: a.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.announcement.kind, &a.announcement.id)
                .cmp(&(&b.announcement.kind, &b.announcement.id))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(id: &str, state: Presence) -> Vec<u8> {
        let identity = Identity::new(id.into(), "transcode", 2, Duration::from_secs(5));
        serde_json::to_vec(&identity.announcement(state, &InFlight::default())).unwrap()
    }

    #[test]
    fn silence_past_the_timeout_is_gone_and_a_goodbye_is_stopped() {
        let start = Instant::now();
        let mut roster = Roster::default();
        roster.hear(&body("a", Presence::Alive), start);
        roster.hear(&body("b", Presence::Stopped), start);
        roster.hear(b"{not an announcement", start);
        roster.hear(&vec![b' '; 2 << 20], start);
        let later = start + Duration::from_secs(20);
        roster.hear(&body("c", Presence::Started), later);
        let listed: Vec<(String, Liveness)> = roster
            .list(later, Duration::from_secs(15))
            .into_iter()
            .map(|l| (l.announcement.id, l.liveness))
            .collect();
        assert_eq!(
            listed,
            [
                (String::from("a"), Liveness::Gone),
                (String::from("b"), Liveness::Stopped),
                (String::from("c"), Liveness::Live)
            ]
        );
    }

    #[test]
    fn an_announcement_carries_who_and_what() {
        let a: Announcement = serde_json::from_slice(&body("w", Presence::Alive)).unwrap();
        assert_eq!((a.kind.as_str(), a.concurrency), ("transcode", 2));
        assert_eq!(a.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            routing_key("transcode", Presence::Alive),
            "worker.transcode.alive"
        );
    }
}
