//! A worker's intake: one consumer per priority queue of its task, feeding the
//! [`StartGate`] that says which delivery takes the next free job slot.
//!
//! Each priority has its own channel, because prefetch is per consumer on quorum queues
//! (no global QoS) and each queue needs its own window: normal = concurrency, high =
//! concurrency + 1 (see [`crate::priority`] for why). Jobs start only when one of the
//! worker's `concurrency` slots (a semaphore permit, held by the job until it is settled)
//! is free, so prefetched deliveries wait here, where a high one can overtake them.

use std::sync::Arc;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::priority::{Priority, StartGate};
use crate::settlement::{Ledger, Settlement};
use crate::topology::Topology;

/// The consumers of one session, the deliveries waiting for a slot, and the slots.
pub(crate) struct Intake {
    high: Stream,
    normal: Stream,
    gate: StartGate<Delivery>,
    slots: Arc<Semaphore>,
}

/// One priority's channel (in its ledger) and consumer. The channel must outlive the
/// jobs it delivered: a delivery is acked on its own channel.
struct Stream {
    ledger: Arc<Ledger>,
    consumer: Consumer,
}

/// A delivery that may start now, with the slot it holds until it is settled, and its
/// settlement (on the channel it came on).
pub(crate) struct Start {
    pub delivery: Delivery,
    pub settlement: Settlement,
    pub slot: OwnedSemaphorePermit,
}

impl Intake {
    /// Opens both consumers of `task` (named `<worker>-<uuid>`), with `concurrency` slots.
    pub(crate) async fn open(
        conn: &Connection,
        topology: &Topology,
        task: &str,
        worker: &str,
        concurrency: u16,
    ) -> anyhow::Result<Self> {
        let open = |priority: Priority, prefetch: u16| async move {
            let channel = conn.create_channel().await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    topology.priority_queue(task, priority).into(),
                    format!("{worker}-{}", Uuid::new_v4().simple()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, anyhow::Error>(Stream {
                ledger: Ledger::new(Arc::new(channel)),
                consumer,
            })
        };
        Ok(Self {
            high: open(Priority::High, concurrency.saturating_add(1)).await?,
            normal: open(Priority::Normal, concurrency).await?,
            gate: StartGate::default(),
            slots: Arc::new(Semaphore::new(usize::from(concurrency))),
        })
    }

    /// The next delivery to start, once a slot is free. Whatever the consumers already
    /// hold is taken into the gate before it chooses (`biased`), so a high delivery that
    /// has arrived always wins over a normal one. Cancel-safe: a delivery taken in stays
    /// in the gate. An error means the broker cancelled a consumer or the channel failed.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Start> {
        loop {
            let waiting = !self.gate.is_empty();
            tokio::select! {
                biased;
                d = self.high.consumer.next() => self.gate.push(Priority::High, delivered(d)?),
                d = self.normal.consumer.next() => self.gate.push(Priority::Normal, delivered(d)?),
                slot = self.slots.clone().acquire_owned(), if waiting => {
                    let slot = slot.expect("the slots semaphore is never closed");
                    let (priority, delivery) = self.gate.pop().expect("the gate was not empty");
                    let settlement = self.settlement(priority, &delivery);
                    return Ok(Start { delivery, settlement, slot });
                }
            }
        }
    }

    /// The settlement of a delivery of the given priority: on its stream's channel. Made
    /// as deliveries leave the gate, which within a priority is the order they arrived
    /// in, as the ledger needs.
    fn settlement(&self, priority: Priority, delivery: &Delivery) -> Settlement {
        let stream = match priority {
            Priority::High => &self.high,
            Priority::Normal => &self.normal,
        };
        Settlement::new(&stream.ledger, delivery.delivery_tag)
    }

    /// Stops both consumers and returns to the queues at once every delivery that has
    /// not started, so other workers can take them. The channels stay open (their ledgers
    /// returned) for the acks of the jobs still running.
    pub(crate) async fn stop(mut self) -> Vec<Arc<Ledger>> {
        let mut unstarted = Vec::new();
        while let Some((priority, delivery)) = self.gate.pop() {
            unstarted.push(self.settlement(priority, &delivery));
        }
        let mut returned = Vec::new();
        for stream in [self.high, self.normal] {
            crate::runtime::stop_consuming(&stream.ledger, stream.consumer).await;
            returned.push(stream.ledger);
        }
        for settlement in unstarted {
            settlement.nack_requeue().await;
        }
        returned
    }
}

/// A consumer's next item as a delivery, or why there is none.
fn delivered(next: Option<lapin::Result<Delivery>>) -> anyhow::Result<Delivery> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("consumer failed")),
        None => Err(anyhow::anyhow!("the broker cancelled our consumer")),
    }
}
