//! Settling deliveries with the broker (ack, or nack to requeue), each once, from any
//! thread, and several jobs' acks in one frame when they finish together.
//!
//! **Why acks are batched.** Each `basic.ack` is a frame the broker parses and, on a
//! quorum queue, a command through its Raft log; for small jobs the acks were the largest
//! part of what a job cost the broker. On a busy channel the [`Ledger`] holds a finished
//! job's ack for a moment (one turn of the async scheduler) and acks every finished
//! delivery at the front of the channel with one `basic.ack` with `multiple` set.
//!
//! **Why that never acks a running job.** `multiple` acks *every* outstanding delivery up
//! to the tag, so the ledger knows every delivery of its channel that is not settled: a
//! [`Settlement`] registers its tag when it is made, and deliveries are taken from a
//! channel in the order the broker numbered them, so every tag below a registered one was
//! registered first. A batch ends below the first delivery still running. A finished one
//! behind a running one (a short job that overtook a long one) is acked on its own once
//! it has waited [`STRAGGLER_WAIT`]: holding it longer would keep its place in the
//! prefetch window. Every frame is queued under the ledger's lock, so a nack or a single
//! ack of a tag is never overtaken by a batch that would cover it.
//!
//! **A lone job is acked at once.** With nothing else open on the channel there is
//! nothing to batch. A job on the filesystem backend is checked, handled and committed in
//! one trip to a blocking thread (see [`crate::runtime`]); at prefetch 1 the broker sends
//! nothing until the ack arrives, so [`Settlement::ack_now`] queues it from that thread,
//! without waiting for the async side to wake.
//!
//! Why on the channel and not through the delivery's `Acker`: the acker forwards through
//! lapin's internal RPC task (a thread wake-up). The channel's own `basic.ack` queues the
//! frame when first polled, which is all this module does; the frame then goes out in
//! order with everything else on the channel. A channel that has closed refuses at once
//! (its deliveries come back to the queue anyway), and a channel of a new connection has
//! a ledger of its own, so a stale delivery tag is never acked on it.
//!
//! At most once: the first of the acks and [`Settlement::nack_requeue`] settles the
//! delivery and the others are then no-ops, because a second settlement of a delivery tag
//! is a protocol error that closes the channel, and with it every other job's delivery on
//! it. A clean shutdown sends what is held with [`Ledger::close`] before the channel
//! closes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::DeliveryTag;
use tokio::sync::Notify;

/// How long a finished delivery behind a running one waits to join a batch before it is
/// acked on its own.
pub(crate) const STRAGGLER_WAIT: Duration = Duration::from_millis(2);

/// The deliveries of one consuming channel not yet settled with the broker, and the
/// finished ones among them whose ack is held for a batch.
pub(crate) struct Ledger {
    channel: Arc<Channel>,
    /// Tag → whether the job is done (its ack held). Every unsettled delivery taken from
    /// the channel is here.
    open: Mutex<BTreeMap<DeliveryTag, bool>>,
    /// Wakes the flushing task.
    wake: Arc<Notify>,
}

impl Ledger {
    /// A ledger for `channel`, with its flushing task (which ends with the ledger).
    pub(crate) fn new(channel: Arc<Channel>) -> Arc<Self> {
        let wake = Arc::new(Notify::new());
        let ledger = Arc::new(Self {
            channel,
            open: Mutex::default(),
            wake: wake.clone(),
        });
        tokio::spawn(flushing(Arc::downgrade(&ledger), wake));
        ledger
    }

    pub(crate) fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<DeliveryTag, bool>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends every held ack whose delivery is at the front (one frame), and with
    /// `stragglers` also those behind a running one (a frame each). True if acks are
    /// still held behind a running delivery.
    fn flush(&self, stragglers: bool) -> bool {
        let mut open = self.lock();
        let acks = take_acks(&mut open, stragglers);
        for (tag, multiple) in acks.frames() {
            self.queue_ack(tag, multiple);
        }
        open.values().any(|done| *done)
    }

    /// Queues one ack frame (the caller holds the lock).
    fn queue_ack(&self, tag: DeliveryTag, multiple: bool) {
        let ack = self.channel.basic_ack(tag, BasicAckOptions { multiple });
        // The rest of the future only waits for the write, which nobody needs.
        if let Poll::Ready(Err(e)) = queue_frames(std::pin::pin!(ack)) {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver the job");
        }
    }

    /// Sends every held ack (all deliveries are settled by now), then closes the channel.
    /// For a clean shutdown, after the jobs have been drained.
    pub(crate) async fn close(&self) -> lapin::Result<()> {
        self.flush(true);
        self.channel.close(200, "worker shutting down".into()).await
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // The flushing task holds only a weak reference: wake it to see it is gone.
        self.wake.notify_one();
    }
}

/// The acks [`take_acks`] took: the front batch (its highest tag, and whether it covers
/// more than one delivery) and the stragglers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Acks {
    front: Option<(DeliveryTag, bool)>,
    stragglers: Vec<DeliveryTag>,
}

impl Acks {
    /// The frames to send: `(tag, multiple)`.
    fn frames(&self) -> impl Iterator<Item = (DeliveryTag, bool)> + '_ {
        self.front
            .into_iter()
            .chain(self.stragglers.iter().map(|tag| (*tag, false)))
    }
}

/// Takes out of `open` the done deliveries to ack now: those before the first still
/// running one, acked together by the highest of their tags; with `stragglers`, the
/// done ones after it too, each on its own.
fn take_acks(open: &mut BTreeMap<DeliveryTag, bool>, stragglers: bool) -> Acks {
    let mut acks = Acks::default();
    let mut count = 0;
    while let Some(entry) = open.first_entry()
        && *entry.get()
    {
        count += 1;
        acks.front = Some((entry.remove_entry().0, count > 1));
    }
    if stragglers {
        acks.stragglers = open.iter().filter(|(_, d)| **d).map(|(t, _)| *t).collect();
        for tag in &acks.stragglers {
            open.remove(tag);
        }
    }
    acks
}

/// The ledger's flushing task: after each wake-up it lets the scheduler run whatever else
/// is ready (other jobs finishing now hold their acks too), then sends the batch. Held
/// stragglers are sent once they have waited [`STRAGGLER_WAIT`].
async fn flushing(ledger: Weak<Ledger>, wake: Arc<Notify>) {
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        match held_since {
            None => wake.notified().await,
            Some(since) => {
                let _ = tokio::time::timeout_at(since + STRAGGLER_WAIT, wake.notified()).await;
            }
        }
        tokio::task::yield_now().await;
        let Some(ledger) = ledger.upgrade() else {
            return;
        };
        let due = held_since.is_some_and(|since| since.elapsed() >= STRAGGLER_WAIT);
        held_since = match ledger.flush(due) {
            true => held_since.or_else(|| Some(tokio::time::Instant::now())),
            false => None,
        };
    }
}

/// One delivery's settlement with the broker. Cheap to clone (the clones share it).
#[derive(Clone)]
pub(crate) struct Settlement {
    /// The ledger of the channel the delivery came on: a delivery tag means something
    /// only there.
    ledger: Arc<Ledger>,
    tag: DeliveryTag,
    settled: Arc<AtomicBool>,
}

impl Settlement {
    /// The settlement of a delivery taken from the ledger's channel, registered as open.
    /// Made in the order the channel's deliveries arrive (see the module doc).
    pub(crate) fn new(ledger: &Arc<Ledger>, tag: DeliveryTag) -> Self {
        ledger.lock().insert(tag, false);
        Self {
            ledger: ledger.clone(),
            tag,
            settled: Arc::default(),
        }
    }

    /// Takes the right to settle; false if that was already done.
    fn take(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }

    /// Acks the delivery now, on its own, without waiting: callable from a blocking
    /// thread. The frame is queued for lapin's I/O loop before this returns. Nothing
    /// waits for it to be written: the broker never answers an ack, and if the connection
    /// fails first the delivery is redelivered, finds its manifest and is acked as a
    /// duplicate.
    pub(crate) fn ack_now(&self) {
        if !self.take() {
            return;
        }
        let mut open = self.ledger.lock();
        open.remove(&self.tag);
        self.ledger.queue_ack(self.tag, false);
    }

    /// Acks the delivery: at once if it is the only one open on its channel, otherwise
    /// with the others that finish meanwhile (see the module doc).
    pub(crate) fn ack(&self) {
        if !self.take() {
            return;
        }
        let mut open = self.ledger.lock();
        if open.len() <= 1 {
            open.remove(&self.tag);
            self.ledger.queue_ack(self.tag, false);
            return;
        }
        open.insert(self.tag, true);
        drop(open);
        self.ledger.wake.notify_one();
    }

    /// Returns the delivery to its queue (unless it was already settled).
    pub(crate) async fn nack_requeue(&self) {
        if !self.take() {
            return;
        }
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        let mut nack = Box::pin(self.ledger.channel.basic_nack(self.tag, options));
        // Queued under the lock, as every frame of the ledger's channel is: no batch
        // queued after it can cover this tag, and none queued before did.
        let queued = {
            let mut open = self.ledger.lock();
            open.remove(&self.tag);
            queue_frames(nack.as_mut())
        };
        let nacked = match queued {
            Poll::Ready(nacked) => nacked,
            Poll::Pending => nack.await,
        };
        if let Err(e) = nacked {
            tracing::warn!(error = %e, "nack failed; the broker will redeliver this job when the channel closes");
        }
    }
}

/// Polls a lapin method future once, from any thread, with no waker: lapin's `basic_ack`,
/// `basic_nack` and `basic_publish` queue their frames for the I/O loop before their
/// first await, so this one poll sends them. What is left of the future only waits for
/// the write; a caller that needs that keeps the future and awaits it.
pub(crate) fn queue_frames<F: Future + ?Sized>(frames: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    frames.poll(&mut Context::from_waker(std::task::Waker::noop()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(entries: &[(u64, bool)]) -> BTreeMap<DeliveryTag, bool> {
        entries.iter().copied().collect()
    }

    #[test]
    fn a_batch_ends_below_the_first_delivery_still_running() {
        let mut open = ledger(&[(3, true), (4, true), (5, false), (6, true)]);
        let acks = take_acks(&mut open, false);
        assert_eq!(acks.front, Some((4, true)));
        assert!(acks.stragglers.is_empty());
        assert_eq!(open, ledger(&[(5, false), (6, true)]));
    }

    #[test]
    fn a_lone_finished_delivery_at_the_front_is_acked_without_multiple() {
        let mut open = ledger(&[(7, true), (8, false)]);
        assert_eq!(
            take_acks(&mut open, false),
            Acks {
                front: Some((7, false)),
                stragglers: vec![]
            }
        );
    }

    #[test]
    fn stragglers_behind_a_running_delivery_are_acked_one_by_one_when_due() {
        let mut open = ledger(&[(5, false), (6, true), (7, false), (9, true)]);
        let acks = take_acks(&mut open, true);
        assert_eq!(acks.front, None);
        assert_eq!(acks.stragglers, vec![6, 9]);
        assert_eq!(
            acks.frames().collect::<Vec<_>>(),
            vec![(6, false), (9, false)]
        );
        assert_eq!(open, ledger(&[(5, false), (7, false)]));
    }

    #[test]
    fn nothing_is_acked_while_the_front_delivery_runs_and_no_straggler_is_due() {
        let mut open = ledger(&[(1, false), (2, true)]);
        assert_eq!(take_acks(&mut open, false), Acks::default());
        assert_eq!(open.len(), 2);
    }
}
