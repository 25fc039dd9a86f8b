//! Settling a delivery with the broker (ack, or nack to requeue), once, from any thread.
//!
//! A job on the filesystem backend is checked, handled and committed in one trip to a
//! blocking thread (see [`crate::runtime`]). Its ack used to wait for that trip to wake
//! the async side again and for lapin's RPC task to forward it: two thread wake-ups
//! between the commit and the broker hearing of it. At prefetch 1 the broker sends
//! nothing until that ack arrives, so those wake-ups were most of what the runtime added
//! to a small job. [`Settlement::ack_now`] queues the ack frame straight for lapin's I/O
//! loop from the thread that made the commit, when that job is the worker's only one
//! (with several running, acks sent from the async side leave together; see
//! `runtime::run_local`).
//!
//! Why on the channel and not through the delivery's `Acker`: the acker forwards through
//! lapin's internal RPC task (the wake-up saved here). The channel's own `basic.ack`
//! queues the frame when first polled, which is all [`Settlement::ack_now`] does; the
//! frame then goes out in order with everything else on the channel. A channel that has
//! closed refuses at once (its deliveries come back to the queue anyway), and a channel
//! of a new connection is a different `Channel`, so a stale delivery tag can never be
//! acked on it.
//!
//! At most once: the first of [`Settlement::ack_now`] and [`Settlement::nack_requeue`]
//! settles the delivery and the other is then a no-op, because a second settlement of a
//! delivery tag is a protocol error that closes the channel, and with it every other
//! job's delivery on it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::DeliveryTag;

/// One delivery's settlement with the broker. Cheap to clone (the clones share it).
#[derive(Clone)]
pub(crate) struct Settlement {
    /// The channel the delivery came on: a delivery tag means something only there.
    channel: Arc<Channel>,
    tag: DeliveryTag,
    settled: Arc<AtomicBool>,
}

impl Settlement {
    pub(crate) fn new(channel: Arc<Channel>, tag: DeliveryTag) -> Self {
        Self {
            channel,
            tag,
            settled: Arc::default(),
        }
    }

    /// Takes the right to settle; false if that was already done.
    fn take(&self) -> bool {
        !self.settled.swap(true, Ordering::AcqRel)
    }

    /// Acks the delivery now, without waiting: callable from a blocking thread. The frame
    /// is queued for lapin's I/O loop before this returns. Nothing waits for it to be
    /// written: the broker never answers an ack, and if the connection fails first the
    /// delivery is redelivered, finds its manifest and is acked as a duplicate.
    pub(crate) fn ack_now(&self) {
        if !self.take() {
            return;
        }
        let ack = self.channel.basic_ack(self.tag, BasicAckOptions::default());
        // The rest of the future only waits for the write, which nobody needs.
        if let Poll::Ready(Err(e)) = queue_frames(std::pin::pin!(ack)) {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver this job");
        }
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
        if let Err(e) = self.channel.basic_nack(self.tag, options).await {
            tracing::warn!(error = %e, "nack failed; the broker will redeliver this job when the channel closes");
        }
    }
}

/// Polls a lapin method future once, from any thread, with no waker: lapin's `basic_ack`
/// and `basic_publish` queue their frames for the I/O loop before their first await, so
/// this one poll sends them. What is left of the future only waits for the write; a
/// caller that needs that keeps the future and awaits it.
pub(crate) fn queue_frames<F: Future + ?Sized>(frames: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    frames.poll(&mut Context::from_waker(std::task::Waker::noop()))
}
