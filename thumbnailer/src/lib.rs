//! The thumbnailer: a poster, thumbnails and scrubbing sprite sheets with a WebVTT track
//! for every upload, decoding with the FFmpeg libraries in-process and encoding images
//! with the `image` crate.
//!
//! - [`settings`]: `[thumbnailer]` settings.
//! - [`grab`]: the frame shown at a time, with one decoder per lane, seeking only when it
//!   pays; it reads the source through `shared::media::Source` (packets, keyframe index,
//!   decoder), as everything here does.
//! - [`images`]: scaling frames upright to RGB, blank-frame detection, image encoding.
//! - [`sprite`]: sheet layout, sheet assembly and the WebVTT track.
//! - [`pipeline`]: the job's targets shared out between lanes (one decoder per core, each
//!   lane its own input reopened from the job's `Source`), each a time-ordered pass
//!   serving the poster, thumbnails and sprite tiles it holds.
//!
//! The consume / ack / retry loop is not here: [`ThumbnailHandler`] plugs into the shared
//! worker runtime.

pub mod grab;
pub mod images;
pub mod pipeline;
pub mod settings;
pub mod sprite;

use shared::media::MediaLimits;
use shared::messages::ThumbnailJob;
use shared::settings::Loaded;
use shared::{Handler, JobContext, JobError, TaskOutput};

pub use settings::ThumbnailerSettings;

/// The thumbnailer's [`Handler`].
#[derive(Debug, Clone, Default)]
pub struct ThumbnailHandler {
    pub settings: ThumbnailerSettings,
    pub limits: MediaLimits,
}

impl ThumbnailHandler {
    /// Reads `[thumbnailer]` and `[media]` from the loaded settings and checks them.
    pub fn from_settings(loaded: &Loaded) -> anyhow::Result<Self> {
        let settings: ThumbnailerSettings = loaded.section("thumbnailer")?;
        settings.validate()?;
        let limits: MediaLimits = loaded.section("media")?;
        shared::media::init();
        Ok(Self { settings, limits })
    }
}

impl Handler for ThumbnailHandler {
    type Job = ThumbnailJob;
    fn handle(&self, job: &ThumbnailJob, ctx: &JobContext) -> Result<TaskOutput, JobError> {
        // The one place a thumbnail job's error is classified (see `shared::outcome`).
        pipeline::thumbnail(job, ctx, &self.settings, &self.limits).map_err(JobError::classify)
    }
}
