//! Media helpers on the FFmpeg libraries (feature `media`), shared by both workers: the
//! one layer between them and a source file. The workers read sources through
//! [`Source`] and nothing else.
//!
//! - [`admit`]: the one way a source is opened: an allow-listed container decided from
//!   its bytes, no other file reachable (playlists, manifests and concat lists refused).
//! - [`probe`]: open a source ([`open`]), describe it ([`SourceInfo`]) and enforce the
//!   configured [`MediaLimits`] before any work, with reasons a person can act on. What a
//!   kind needs of its source is its registry entry's `needs_video` ([`Needs::of`]):
//!   [`open`] is for kinds that need video (refusing a source without it);
//!   [`open_streams`] takes an audio-only source for a kind that does not.
//! - [`source`]: the opened source: packets with the read-error budget
//!   ([`Source::packets`]), where its streams start, its frame rate (one rule), its
//!   keyframe index (read once), its video decoder, and [`Reopen`] for more inputs on the
//!   same file; also the one core count ([`cores`]). [`Streams`] is the same for a source
//!   whose video is optional.
//! - [`keyframes`]: the container's keyframe index, the one FFI read outside `admit`.
//! - [`decode`]: the video decoder both workers use (threading on, decode errors mapped to
//!   clear permanent failures, every decoded frame held to the limits) and the
//!   filter-graph plumbing that turns decoded frames into upright, scaled frames.
//!
//! Everything here returns `anyhow` errors, marked [`permanent`](crate::permanent) where retrying cannot
//! help: a source FFmpeg cannot read is the uploader's problem, never a reason to retry.
//! The workers' handlers classify them once into a [`crate::JobError`].

pub mod admit;
pub mod decode;
pub mod keyframes;
pub mod probe;
pub mod source;

pub use admit::open_input;
pub use decode::{FrameGraph, VideoDecoder};
pub use probe::{
    AudioInfo, MediaLimits, Needs, SourceInfo, StreamsInfo, VideoInfo, open, open_streams,
};
pub use source::{
    Corrupt, MAX_READ_ERRORS, Packets, Reopen, Source, Streams, cores, frame_rate, keyframe_before,
};

use std::sync::Once;

use ffmpeg_next as ffmpeg;

use crate::outcome::mark_permanent;

/// Initialises the FFmpeg libraries once per process and keeps their own logging to
/// errors only (our tracing logs say what happened to a job).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // `init` only registers devices/network; it cannot fail on FFmpeg 5+.
        let _ = ffmpeg::init();
        ffmpeg::log::set_level(ffmpeg::log::Level::Fatal);
    });
}

/// Seconds of a timestamp in `time_base`.
pub fn seconds(ts: i64, time_base: ffmpeg::Rational) -> f64 {
    if time_base.denominator() == 0 {
        return 0.0;
    }
    ts as f64 * f64::from(time_base.numerator()) / f64::from(time_base.denominator())
}

/// A timestamp in `time_base` for `seconds`.
pub fn timestamp(seconds: f64, time_base: ffmpeg::Rational) -> i64 {
    if time_base.numerator() == 0 {
        return 0;
    }
    (seconds * f64::from(time_base.denominator()) / f64::from(time_base.numerator())).round() as i64
}

/// An FFmpeg failure while working on the source: permanent, with what we were doing.
pub fn source_error(doing: &str, err: ffmpeg::Error) -> anyhow::Error {
    mark_permanent(anyhow::Error::new(err).context(doing.to_owned()))
}

/// An FFmpeg failure on our own side (encoder, muxer, filter). Outputs live in local
/// scratch space: a full disk or an I/O error there is transient (another attempt, maybe on
/// another machine, can succeed), so it is left unmarked; anything else is deterministic
/// for this source and retrying would only burn time, so it is marked permanent.
pub fn pipeline_error(doing: &str, err: ffmpeg::Error) -> anyhow::Error {
    const ENOSPC: i32 = 28;
    const EIO: i32 = 5;
    const ENOMEM: i32 = 12;
    let transient =
        matches!(err, ffmpeg::Error::Other { errno } if [ENOSPC, EIO, ENOMEM].contains(&errno));
    let err = anyhow::Error::new(err).context(doing.to_owned());
    if transient { err } else { mark_permanent(err) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JobError;

    #[test]
    fn ffmpeg_errors_are_classified_by_kind() {
        let full = ffmpeg::Error::Other { errno: 28 };
        assert!(matches!(
            JobError::classify(pipeline_error("writing 720p.mp4", full)),
            JobError::Transient(r) if r.starts_with("writing 720p.mp4: ")
        ));
        assert!(matches!(
            JobError::classify(pipeline_error("encoding", ffmpeg::Error::InvalidData)),
            JobError::Permanent(r) if r.starts_with("encoding: ")
        ));
        assert!(matches!(
            JobError::classify(source_error("reading", ffmpeg::Error::Other { errno: 28 })),
            JobError::Permanent(_)
        ));
    }
}
