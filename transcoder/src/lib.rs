//! The transcoder: turns each upload into an adaptive ladder of H.264/AAC renditions, as
//! MP4 (index at the front), HLS (MPEG-TS) and CMAF (fMP4 for HLS and DASH), decoding the
//! source once with the FFmpeg libraries in-process.
//!
//! - [`settings`]: `[transcoder]` settings (preset, CRF, keyframe and segment lengths).
//! - [`ladder`]: the default ladder and each rendition's size (never upscaling).
//! - [`pipeline`]: demux → decode → upright → split/scale → encode, one pass, reading the
//!   source through `shared::media::Source` (packets, start offset, frame rate, decoder).
//! - [`encode`]: one rendition's encoders and its MP4/HLS muxers.
//! - [`fit`]: the ladder fitted to the content (`ladder: auto`): each rung's CRF and
//!   cap from a quick [`probe`] of the source (sample encodes measured with
//!   [`quality`]'s SSIM/PSNR), rungs that add nothing dropped.
//! - [`hls`]: the master playlist, measured bandwidths, H.264 levels for `CODECS`.
//! - [`cmaf`]: fMP4 renditions (audio as its own) under one HLS master and one DASH MPD,
//!   written from what [`fmp4`] reads back of the segments.
//! - Segmented transcoding (one long source, many workers): [`segments`] plans
//!   frame-exact ranges, [`segment_encode`] encodes one range's video or the whole audio
//!   into [`parts`] files, [`stitch`] copies them into the same outputs a single pass
//!   makes, checking every seam; [`segmented`] turns a job into those parts (the plan
//!   fanned out to every transcoder) and runs each one.
//!
//! The consume / ack / retry loop is not here: [`TranscodeHandler`] plugs into the shared
//! worker runtime.

pub mod cmaf;
pub mod encode;
pub mod fit;
pub mod fmp4;
pub mod hls;
pub mod ladder;
pub mod parts;
pub mod pipeline;
pub mod probe;
pub mod quality;
pub mod segment_encode;
pub mod segmented;
pub mod segments;
pub mod settings;
pub mod stitch;

use shared::media::MediaLimits;
use shared::messages::TranscodeJob;
use shared::settings::Loaded;
use shared::{Handler, JobContext, JobError, TaskOutput};

pub use segment_encode::{AudioPart, PartFile, encode_audio, encode_segment};
pub use segments::{SegmentRange, plan_ranges};
pub use settings::TranscoderSettings;
pub use stitch::{SegmentParts, stitch};

/// The transcoder's [`Handler`].
#[derive(Debug, Clone, Default)]
pub struct TranscodeHandler {
    pub settings: TranscoderSettings,
    pub limits: MediaLimits,
}

impl TranscodeHandler {
    /// Reads `[transcoder]` and `[media]` from the loaded settings and checks them.
    pub fn from_settings(loaded: &Loaded) -> anyhow::Result<Self> {
        let settings: TranscoderSettings = loaded.section("transcoder")?;
        settings.validate()?;
        let limits: MediaLimits = loaded.section("media")?;
        shared::media::init();
        Ok(Self { settings, limits })
    }
}

impl Handler for TranscodeHandler {
    type Job = TranscodeJob;
    fn handle(&self, job: &TranscodeJob, ctx: &JobContext) -> Result<TaskOutput, JobError> {
        // The one place a transcode's error is classified (see `shared::outcome`).
        segmented::run(job, ctx, &self.settings, &self.limits).map_err(JobError::classify)
    }
}
