//! A worker session's side channel to operators: the cancel listener ([`crate::cancel`])
//! and the heartbeats of the worker registry ([`crate::workers`]), started together when
//! a session starts consuming and stopped with it. Kept out of the consume loop so the
//! runtime hooks it in with one call at the start and one at a clean end.

use lapin::Connection;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::events::EventPublisher;
use crate::inflight::InFlight;
use crate::workers::{Identity, Presence, spawn_heartbeat};

/// The running side channel; dropping it (a lost session) stops both tasks silently.
pub struct OperatorChannel {
    identity: Identity,
    events: EventPublisher,
    in_flight: InFlight,
    _stop: DropGuard,
}

impl OperatorChannel {
    /// Binds the control queue (so a cancel sent from now on reaches this worker), then
    /// announces the worker and keeps announcing it.
    pub async fn start(
        conn: &Connection,
        events_exchange: &str,
        identity: Identity,
        events: &EventPublisher,
        in_flight: &InFlight,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        crate::cancel::listen(conn, events_exchange, in_flight.clone(), stop.clone()).await?;
        spawn_heartbeat(
            identity.clone(),
            events.clone(),
            in_flight.clone(),
            stop.clone(),
        );
        Ok(Self {
            identity,
            events: events.clone(),
            in_flight: in_flight.clone(),
            _stop: stop.drop_guard(),
        })
    }

    /// A clean end (shutdown, jobs settled): says goodbye, then stops both tasks.
    pub fn end(self) {
        self.identity
            .announce(&self.events, Presence::Stopped, &self.in_flight);
    }
}
