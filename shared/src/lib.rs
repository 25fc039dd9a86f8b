//! vidpipe's shared library: everything the producer and the two workers have in common.
//!
//! - [`settings`]: layered configuration (defaults, file, `VIDPIPE__*` environment).
//! - [`telemetry`]: tracing setup, text or JSON lines.
//! - [`storage_key`], [`messages`]: the message contract and its validation.
//! - [`tasks`]: the task registry: every task kind, declared once, and the broker users
//!   derived from it.
//! - [`priority`]: high and normal jobs: the second work queue per kind and the
//!   worker's start gate that prefers high deliveries without starving normal ones.
//! - [`topology`]: exchange and queue names and their idempotent declaration.
//! - [`broker`]: connecting with backoff, publishing with confirms.
//! - [`outcome`]: job errors and the pure outcome → broker action decision.
//! - [`handler`]: the trait both workers implement.
//! - [`runtime`]: the one consume / ack / retry / dead-letter loop.
//! - `settlement`: a delivery's ack or requeue, once, from any thread.
//! - [`split`]: split jobs: fan-out into parts, fan-in to one join, race-free.
//! - [`events`]: job events on `video_events`.
//! - [`cancel`]: cancelling a job: the marker in storage and the live-stop control message.
//! - [`inflight`]: the jobs a worker is running, shared by cancel and the heartbeats.
//! - [`operator`]: a worker session's cancel listener and heartbeats, started together.
//! - [`workers`]: the worker registry: announcements on `video_events`, and who is live.
//! - [`storage`]: object storage with atomic commits; `anyhow` errors marked permanent
//!   where retrying cannot help, classified once by the runtime.
//! - [`manifest`]: the typed `manifest.json` that records a completed task.
//! - [`sniff`]: uploads that are lists of other files (playlists, manifests), by their
//!   first bytes, for the producer and the workers alike.
//! - [`health`]: readiness, liveness and Prometheus metrics over HTTP.
//! - [`shutdown`]: SIGTERM/SIGINT as a cancellation token.
//! - [`app`]: the shared `main` of the worker binaries.
//! - `media` (feature `media`): the one source layer on FFmpeg: admission, probing (what
//!   a kind needs by its `needs_video`), input limits, packets, keyframes, decoders.

pub mod app;
pub mod broker;
pub mod cancel;
pub mod events;
pub mod handler;
pub mod health;
pub mod inflight;
mod intake;
pub mod manifest;
#[cfg(feature = "media")]
pub mod media;
pub mod messages;
pub mod operator;
pub mod outcome;
pub mod priority;
pub mod runtime;
pub mod settings;
mod settlement;
pub mod shutdown;
pub mod sniff;
pub mod split;
pub mod storage;
pub mod storage_key;
pub mod tasks;
pub mod telemetry;
pub mod topology;
pub mod workers;

pub use handler::{Handler, JobContext, OutputFile, TaskOutput};
pub use outcome::{JobError, PermanentExt, permanent};
