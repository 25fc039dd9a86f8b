//! An opened, probed and accepted source, and everything both workers read from it: the
//! packets (with one budget for read errors), where its streams start, its frame rate,
//! the container's keyframe index and a decoder for its video.
//!
//! A [`Source`] comes from [`super::open`] (admitted through [`super::admit`], probed,
//! held to the [`MediaLimits`]); a kind that needs no video gets [`Streams`] from
//! [`super::open_streams`], the same with the video optional. Work that reads the file in several places at once (the
//! thumbnailer's lanes) opens more inputs through a [`Reopen`] handle: the same admitted
//! path, the same description, and the keyframe index read once and shared, not read
//! again per input.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ffmpeg::format::context::Input;
use ffmpeg::{Packet, Rational};
use ffmpeg_next as ffmpeg;

use super::decode::VideoDecoder;
use super::probe::{AudioInfo, MediaLimits, SourceInfo, StreamsInfo};
use super::{keyframes, seconds};
use crate::outcome::{mark_permanent, permanent};

/// Read errors in a row after which the source counts as corrupt.
pub const MAX_READ_ERRORS: u32 = 16;

/// The fastest frame rate taken as real: above it a stream's declared rate is a timing
/// artefact (a raw stream's time base, say), not a rate frames come at.
pub const MAX_FRAME_RATE: f64 = 240.0;

/// An opened, probed and accepted source.
pub struct Source {
    input: Input,
    pub info: SourceInfo,
    path: PathBuf,
    limits: MediaLimits,
    /// Keyframe times from the container's index, read on first use.
    keyframes: Arc<OnceLock<Arc<[f64]>>>,
}

impl Source {
    /// Wraps an input [`super::open`] admitted, probed and checked.
    pub(super) fn new(path: &Path, input: Input, info: SourceInfo, limits: &MediaLimits) -> Self {
        Self {
            input,
            info,
            path: path.to_owned(),
            limits: limits.clone(),
            keyframes: Arc::default(),
        }
    }

    /// The time base of stream `index`'s timestamps.
    pub fn time_base(&self, index: usize) -> anyhow::Result<Rational> {
        self.input
            .stream(index)
            .map(|s| s.time_base())
            .ok_or_else(|| permanent(format!("source stream {index} vanished")))
    }

    /// The limits the source was accepted under (and its decoders hold frames to).
    pub fn limits(&self) -> &MediaLimits {
        &self.limits
    }

    /// Seconds where stream `index` starts; `None` when the container does not say.
    pub fn stream_start_s(&self, index: usize) -> Option<f64> {
        self.input.stream(index).and_then(|s| stream_start_s(&s))
    }

    /// Seconds where the video stream starts (0 when unknown): time 0 of the video.
    pub fn video_start_s(&self) -> f64 {
        self.stream_start_s(self.info.video.index).unwrap_or(0.0)
    }

    /// Seconds where the earliest of the video and audio streams starts (0 when neither
    /// says): shifting every stream by this makes outputs begin at 0 with the gaps between
    /// streams (audio starting late, say) kept.
    pub fn start_s(&self) -> f64 {
        let audio = self.info.audio.as_ref().map(|a| a.index);
        let earliest = [Some(self.info.video.index), audio]
            .into_iter()
            .flatten()
            .filter_map(|i| self.stream_start_s(i))
            .fold(f64::INFINITY, f64::min);
        if earliest.is_finite() { earliest } else { 0.0 }
    }

    /// The video's frame rate by the one rule ([`frame_rate`]); `None` when unknown.
    pub fn frame_rate(&self) -> Option<Rational> {
        self.input
            .stream(self.info.video.index)
            .and_then(|s| frame_rate(&s))
    }

    /// Keyframe times (seconds from the start of the video) from the container's index,
    /// empty when it has none. Read once per source and shared with every [`Reopen`]ed
    /// input.
    pub fn keyframes(&self) -> Arc<[f64]> {
        Arc::clone(
            self.keyframes
                .get_or_init(|| keyframes::indexed(&self.input, self.info.video.index).into()),
        )
    }

    /// A decoder for the video stream (`threads` = 0: one per core), every frame held to
    /// the limits.
    pub fn decoder(&self, threads: usize) -> anyhow::Result<VideoDecoder> {
        VideoDecoder::open(&self.input, &self.info.video, threads, &self.limits)
    }

    /// A decoder for the audio stream `audio` (from [`SourceInfo::audio`]).
    pub fn audio_decoder(&self, audio: &AudioInfo) -> anyhow::Result<ffmpeg::decoder::Audio> {
        super::decode::open_audio_decoder(&self.input, audio)
    }

    /// Reads packets of every stream with the read-error budget; see [`Packets`].
    pub fn packets(&mut self) -> Packets<'_> {
        Packets::new(&mut self.input)
    }

    /// Seeks to the keyframe at or before `at_s` (container time, in seconds); `false`
    /// when the input cannot seek, and then nothing moved.
    pub fn seek(&mut self, at_s: f64) -> bool {
        let target = (at_s * 1_000_000.0) as i64;
        self.input.seek(target, ..target + 1).is_ok()
    }

    /// A handle that opens this source again, for reading it in another place at once.
    /// The keyframe index is read now, so every input opened from the handle shares it.
    pub fn reopener(&self) -> Reopen {
        self.keyframes();
        Reopen {
            path: self.path.clone(),
            info: self.info.clone(),
            limits: self.limits.clone(),
            keyframes: Arc::clone(&self.keyframes),
        }
    }
}

/// An opened, probed and accepted source whose video may be absent: what
/// [`super::open_streams`] gives a kind that does not need video. Its audio and packets
/// read as a [`Source`]'s do; [`Streams::into_source`] is the [`Source`] of a source with
/// video.
pub struct Streams {
    input: Input,
    pub info: StreamsInfo,
    path: PathBuf,
    limits: MediaLimits,
}

impl Streams {
    /// Wraps an input [`super::open_streams`] admitted, probed and checked.
    pub(super) fn new(path: &Path, input: Input, info: StreamsInfo, limits: &MediaLimits) -> Self {
        Self {
            input,
            info,
            path: path.to_owned(),
            limits: limits.clone(),
        }
    }

    /// A decoder for the audio stream `audio` (from [`StreamsInfo::audio`]).
    pub fn audio_decoder(&self, audio: &AudioInfo) -> anyhow::Result<ffmpeg::decoder::Audio> {
        super::decode::open_audio_decoder(&self.input, audio)
    }

    /// Reads packets of every stream with the read-error budget; see [`Packets`].
    pub fn packets(&mut self) -> Packets<'_> {
        Packets::new(&mut self.input)
    }

    /// The source as a [`Source`], which has a video stream; without one, refused as
    /// [`super::open`] refuses it.
    pub fn into_source(self) -> anyhow::Result<Source> {
        let StreamsInfo {
            container,
            duration_s,
            size_bytes,
            video,
            audio,
        } = self.info;
        let Some(video) = video else {
            return Err(super::probe::no_stream(&self.input, "video stream"));
        };
        let info = SourceInfo {
            container,
            duration_s,
            size_bytes,
            video,
            audio,
        };
        Ok(Source::new(&self.path, self.input, info, &self.limits))
    }
}

/// Opens an accepted source again (the one admitted way, [`super::admit::open_input`]),
/// with its description and keyframe index taken from the first opening; `Send` and
/// `Sync`, so threads can each open their own input.
#[derive(Clone)]
pub struct Reopen {
    path: PathBuf,
    info: SourceInfo,
    limits: MediaLimits,
    keyframes: Arc<OnceLock<Arc<[f64]>>>,
}

impl Reopen {
    /// Another input on the source.
    pub fn open(&self) -> anyhow::Result<Source> {
        Ok(Source {
            input: super::admit::open_input(&self.path)?,
            info: self.info.clone(),
            path: self.path.clone(),
            limits: self.limits.clone(),
            keyframes: Arc::clone(&self.keyframes),
        })
    }
}

/// The source's packets, read through a budget for read errors: a damaged packet is
/// skipped (the demuxer may resync on the next read), [`MAX_READ_ERRORS`] in a row mean
/// the source is corrupt or truncated. One budget per reading pass.
pub struct Packets<'a> {
    input: &'a mut Input,
    errors: u32,
}

impl<'a> Packets<'a> {
    /// A reading pass over `input`, with a full budget.
    fn new(input: &'a mut Input) -> Self {
        Self { input, errors: 0 }
    }

    /// Reads the next packet into `packet`: `Ok(true)` for a packet, `Ok(false)` at the
    /// end of the source, [`Corrupt`] when the budget is spent.
    pub fn read(&mut self, packet: &mut Packet) -> Result<bool, Corrupt> {
        loop {
            match packet.read(self.input) {
                Ok(()) => {
                    self.errors = 0;
                    return Ok(true);
                }
                Err(ffmpeg::Error::Eof) => return Ok(false),
                Err(e) => {
                    self.errors += 1;
                    if self.errors >= MAX_READ_ERRORS {
                        return Err(Corrupt(e));
                    }
                }
            }
        }
    }
}

/// The read error that spent the budget: the source is corrupt or truncated.
#[derive(Debug)]
pub struct Corrupt(pub ffmpeg::Error);

impl Corrupt {
    /// The permanent failure, naming how far reading got when that is known.
    pub fn error(self, after_s: Option<f64>) -> anyhow::Error {
        let what = match after_s {
            Some(s) => format!("source is corrupt or truncated after {s:.2} s"),
            None => "source is corrupt or truncated".to_owned(),
        };
        mark_permanent(anyhow::Error::new(self.0).context(what))
    }
}

/// Seconds where `stream` starts; `None` when the container does not say.
pub fn stream_start_s(stream: &ffmpeg::format::stream::Stream) -> Option<f64> {
    match stream.start_time() {
        ts if ts == ffmpeg::ffi::AV_NOPTS_VALUE => None,
        ts => Some(seconds(ts, stream.time_base())),
    }
}

/// The one frame-rate rule: the stream's average rate, else its base rate, each only
/// when it is a real rate (positive, at most [`MAX_FRAME_RATE`]); `None` when neither is.
pub fn frame_rate(stream: &ffmpeg::format::stream::Stream) -> Option<Rational> {
    let usable = |r: Rational| {
        (r.numerator() > 0 && r.denominator() > 0 && f64::from(r) <= MAX_FRAME_RATE).then_some(r)
    };
    usable(stream.avg_frame_rate()).or_else(|| usable(stream.rate()))
}

/// The keyframe of the sorted `keyframes` at or before `t`, if any.
pub fn keyframe_before(keyframes: &[f64], t: f64) -> Option<f64> {
    let i = keyframes.partition_point(|k| *k <= t + 1e-6);
    i.checked_sub(1).map(|i| keyframes[i])
}

/// Cores to use: `threads` when set, else every core the process may run on.
pub fn cores(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyframe_before_a_time_is_at_or_before_it() {
        let keyframes = [0.0, 2.0, 4.0];
        assert_eq!(keyframe_before(&keyframes, 3.9), Some(2.0));
        assert_eq!(keyframe_before(&keyframes, 4.0), Some(4.0));
        assert_eq!(keyframe_before(&[1.0], 0.5), None);
        assert_eq!(keyframe_before(&[], 3.0), None);
    }

    #[test]
    fn cores_are_the_setting_else_the_machine() {
        assert_eq!(cores(3), 3);
        assert!(cores(0) >= 1);
    }

    #[test]
    fn a_spent_budget_says_how_far_reading_got() {
        let e = |after| crate::JobError::classify(Corrupt(ffmpeg::Error::InvalidData).error(after));
        assert!(matches!(
            e(Some(1.5)),
            crate::JobError::Permanent(r) if r.starts_with("source is corrupt or truncated after 1.50 s: ")
        ));
        assert!(matches!(
            e(None),
            crate::JobError::Permanent(r) if r.starts_with("source is corrupt or truncated: ")
        ));
    }
}
