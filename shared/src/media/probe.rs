//! Probing a source (opened through [`super::admit`], the one way in), and the input
//! limits every job is checked against: here on what the headers declare, and again by
//! the decoder on every frame it actually produces ([`super::decode`]).
//!
//! The probe reads each stream's codec parameters ([`super::admit::codec_params`]) and
//! opens no decoder: a source's one video decoder context is opened by
//! [`super::Source::decoder`], with the worker's threads and the pixel cap set.
//!
//! Each refusal is a permanent failure whose text says what was found and what the limit
//! is ("source is 7680x4320, limit is 3840x2160"), because it ends up in the dead-letter
//! headers and in `producer status` for a person to act on.

use std::path::Path;

use anyhow::Context as _;
use ffmpeg::format::context::Input;
use ffmpeg::media::Type as MediaType;
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};

use super::admit::codec_params;
use super::source::{Source, Streams};
use super::{init, seconds};
use crate::outcome::{PermanentExt as _, permanent};
use crate::tasks::TaskKind;

/// Limits on what a worker accepts (`[media]` in the settings file, `VIDPIPE__MEDIA__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaLimits {
    /// Longest accepted source, in seconds.
    pub max_duration_s: f64,
    /// Largest accepted frame: the long side may be at most the larger of these, the
    /// short side at most the smaller (so portrait 2160x3840 passes a 3840x2160 limit).
    pub max_width: u32,
    pub max_height: u32,
    /// Largest accepted source file, in bytes.
    pub max_file_bytes: u64,
    /// Most streams a container may have (a file with hundreds is hostile, not a video).
    pub max_streams: u32,
    /// Most extreme pixel aspect ratio accepted, either way: 4 takes 1:4 to 4:1. Real
    /// anamorphic video stays within 2:1; a 1:100 file would make 100-times-tall pictures.
    pub max_pixel_aspect: f64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            max_duration_s: 4.0 * 3600.0,
            max_width: 3840,
            max_height: 2160,
            max_file_bytes: 20 * 1024 * 1024 * 1024,
            max_streams: 32,
            max_pixel_aspect: 4.0,
        }
    }
}

impl MediaLimits {
    /// Most pixels in one picture: what a decoder may allocate for a frame.
    pub fn max_pixels(&self) -> i64 {
        i64::from(self.max_width) * i64::from(self.max_height)
    }

    /// A picture (`what` names it: "source", "source frame at 3.20 s", "thumbnail") must
    /// fit the limits either way round: its long side within the larger limit and its
    /// short side within the smaller, so portrait 2160x3840 passes a 3840x2160 limit.
    pub fn check_picture(&self, what: &str, width: u32, height: u32) -> anyhow::Result<()> {
        let (long, short) = (width.max(height), width.min(height));
        let (max_long, max_short) = (
            self.max_width.max(self.max_height),
            self.max_width.min(self.max_height),
        );
        if long > max_long || short > max_short || width == 0 || height == 0 {
            return Err(permanent(format!(
                "{what} is {width}x{height}, limit is {}x{}",
                self.max_width, self.max_height
            )));
        }
        Ok(())
    }

    /// A pixel aspect ratio `num:den` (0 or negative: unset, square) must be within
    /// [`Self::max_pixel_aspect`] either way.
    pub fn check_pixel_aspect(&self, what: &str, num: i32, den: i32) -> anyhow::Result<()> {
        if num <= 0 || den <= 0 {
            return Ok(());
        }
        let ratio = f64::from(num) / f64::from(den);
        let max = self.max_pixel_aspect.max(1.0);
        if ratio > max || ratio < 1.0 / max {
            return Err(permanent(format!(
                "{what} has a pixel aspect ratio of {num}:{den}; vidpipe takes 1:{max} to {max}:1"
            )));
        }
        Ok(())
    }
}

/// What a probe found, as written into the task's manifest.
#[derive(Debug, Clone, Serialize)]
pub struct SourceInfo {
    /// Container format as FFmpeg names it, e.g. `mov,mp4,m4a,3gp,3g2,mj2`.
    pub container: String,
    /// Seconds; 0 when the container does not say.
    pub duration_s: f64,
    pub size_bytes: u64,
    pub video: VideoInfo,
    pub audio: Option<AudioInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VideoInfo {
    #[serde(skip)]
    pub index: usize,
    pub codec: String,
    /// Coded size, as stored.
    pub width: u32,
    pub height: u32,
    /// Size as shown: rotation and a non-square pixel aspect ratio applied.
    pub display_width: u32,
    pub display_height: u32,
    /// Clockwise degrees the stored picture must turn to be upright: 0, 90, 180 or 270.
    pub rotation: u32,
    /// Frame rate by the one rule ([`super::source::frame_rate`]); 0 when unknown.
    pub frame_rate: f64,
    pub pixel_format: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AudioInfo {
    #[serde(skip)]
    pub index: usize,
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u16,
}

/// What a task kind needs of its source: its registry entry's
/// [`needs_video`](crate::tasks::TaskKind::needs_video) decides, through [`Needs::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// A video stream: a source without one is refused, with what it has instead.
    Video,
    /// An audio or a video stream: an audio-only source is taken (a loudness task, say).
    AudioOrVideo,
}

impl Needs {
    /// What `kind` needs of its source, by its registry entry.
    pub fn of(kind: &TaskKind) -> Self {
        if kind.needs_video {
            Self::Video
        } else {
            Self::AudioOrVideo
        }
    }
}

/// What a probe found when the video may be absent ([`open_streams`]): [`SourceInfo`]
/// with the video optional.
#[derive(Debug, Clone, Serialize)]
pub struct StreamsInfo {
    /// Container format as FFmpeg names it, e.g. `mov,mp4,m4a,3gp,3g2,mj2`.
    pub container: String,
    /// Seconds; 0 when the container does not say.
    pub duration_s: f64,
    pub size_bytes: u64,
    pub video: Option<VideoInfo>,
    pub audio: Option<AudioInfo>,
}

/// Opens `path` for a kind that needs video, probes it and checks it against `limits`; a
/// source with no video stream is refused, saying what it has. The path of every builtin
/// kind (their registry entries need video); [`open_streams`] is the path by kind.
pub fn open(path: &Path, limits: &MediaLimits) -> anyhow::Result<Source> {
    open_streams(path, limits, Needs::Video)?.into_source()
}

/// Opens `path` for a kind that needs `needs` ([`Needs::of`] its registry entry), probes
/// it and checks it against `limits`. A video stream, when there is one, is held to the
/// same limits as by [`open`]; without one, [`Needs::Video`] refuses the source and
/// [`Needs::AudioOrVideo`] takes it if it has audio.
pub fn open_streams(path: &Path, limits: &MediaLimits, needs: Needs) -> anyhow::Result<Streams> {
    init();
    let size_bytes = std::fs::metadata(path)
        .context("cannot read the source")
        .permanent()?
        .len();
    if size_bytes == 0 {
        return Err(permanent("source is empty (0 bytes)"));
    }
    if size_bytes > limits.max_file_bytes {
        return Err(permanent(format!(
            "source is {size_bytes} bytes, limit is {} bytes",
            limits.max_file_bytes
        )));
    }
    let input = super::admit::open_input(path)?;
    let streams = input.streams().count();
    if streams > limits.max_streams as usize {
        return Err(permanent(format!(
            "source has {streams} streams, limit is {}",
            limits.max_streams
        )));
    }
    let video = match main_video(&input) {
        Some(stream) => Some(video_info(&stream, limits)?),
        None if needs == Needs::Video => return Err(no_stream(&input, "video stream")),
        None => None,
    };
    let audio = audio_info(&input);
    let main = match (&video, &audio) {
        (Some(v), _) => v.index,
        (None, Some(a)) => a.index,
        (None, None) => return Err(no_stream(&input, "audio or video stream")),
    };
    let duration_s = duration_of(&input, main);
    if duration_s > limits.max_duration_s {
        return Err(permanent(format!(
            "source is {duration_s:.1} s long, limit is {} s",
            limits.max_duration_s
        )));
    }
    let info = StreamsInfo {
        container: input.format().name().to_owned(),
        duration_s,
        size_bytes,
        video,
        audio,
    };
    Ok(Streams::new(path, input, info, limits))
}

/// The refusal of a source without `what` ("video stream"), naming the streams it has.
pub(super) fn no_stream(input: &Input, what: &str) -> anyhow::Error {
    let kinds: Vec<String> = input
        .streams()
        .map(|s| {
            format!(
                "{:?} {}",
                s.parameters().medium(),
                s.parameters().id().name()
            )
        })
        .collect();
    permanent(if kinds.is_empty() {
        format!("source has no {what} (no streams at all)")
    } else {
        format!(
            "source has no {what} (it has: {})",
            kinds.join(", ").to_lowercase()
        )
    })
}

/// The main video stream: FFmpeg's best pick, ignoring cover art; `None` when there is
/// no video.
fn main_video(input: &Input) -> Option<ffmpeg::format::stream::Stream<'_>> {
    input
        .streams()
        .filter(|s| s.parameters().medium() == MediaType::Video)
        .filter(|s| {
            !s.disposition()
                .contains(ffmpeg::format::stream::Disposition::ATTACHED_PIC)
        })
        .max_by_key(|s| {
            // Prefer FFmpeg's own choice, then the largest picture.
            let best = input.streams().best(MediaType::Video).map(|b| b.index()) == Some(s.index());
            let p = codec_params(s);
            (best, u64::from(p.width) * u64::from(p.height))
        })
}

/// The video stream `stream` described and held to `limits`.
fn video_info(
    stream: &ffmpeg::format::stream::Stream,
    limits: &MediaLimits,
) -> anyhow::Result<VideoInfo> {
    let id = stream.parameters().id();
    if ffmpeg::decoder::find(id).is_none() || id == ffmpeg::codec::Id::None {
        return Err(permanent(format!(
            "source video codec `{}` is not supported by this build",
            id.name()
        )));
    }
    // Read from the stream's parameters: the one decoder is opened later, by the worker.
    let params = codec_params(stream);
    let (width, height) = (params.width, params.height);
    if width == 0 || height == 0 {
        return Err(permanent(format!(
            "source video stream (`{}`) has no picture size; the file is damaged or not a video",
            id.name()
        )));
    }
    let rotation = rotation_of(stream);
    let sar = params.sample_aspect_ratio;
    limits.check_pixel_aspect("source", sar.numerator(), sar.denominator())?;
    let shown_w = shown_width(width, sar);
    let (display_width, display_height) = if rotation % 180 == 90 {
        (height, shown_w)
    } else {
        (shown_w, height)
    };
    let frame_rate = super::source::frame_rate(stream).map_or(0.0, f64::from);
    let info = VideoInfo {
        index: stream.index(),
        codec: id.name().to_owned(),
        width,
        height,
        display_width,
        display_height,
        rotation,
        frame_rate,
        pixel_format: format!("{:?}", params.pixel_format).to_lowercase(),
    };
    limits.check_picture("source", info.width, info.height)?;
    limits.check_picture("source as shown", info.display_width, info.display_height)?;
    Ok(info)
}

fn audio_info(input: &Input) -> Option<AudioInfo> {
    let stream = input.streams().best(MediaType::Audio)?;
    let id = stream.parameters().id();
    ffmpeg::decoder::find(id)?;
    let params = codec_params(&stream);
    if params.sample_rate == 0 {
        return None;
    }
    Some(AudioInfo {
        index: stream.index(),
        codec: id.name().to_owned(),
        sample_rate: params.sample_rate,
        channels: params.channels,
    })
}

/// Width as shown: the stored width times the pixel aspect ratio `sar` (square when unset
/// or invalid), at least 1.
pub fn shown_width(width: u32, sar: ffmpeg::Rational) -> u32 {
    if sar.numerator() > 0 && sar.denominator() > 0 {
        (f64::from(width) * f64::from(sar.numerator()) / f64::from(sar.denominator())).round()
            as u32
    } else {
        width
    }
    .max(1)
}

/// Container duration, else the main stream's (the video, else the audio); 0 when
/// neither is known.
fn duration_of(input: &Input, main_index: usize) -> f64 {
    let d = input.duration();
    if d > 0 {
        return d as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE);
    }
    input
        .stream(main_index)
        .filter(|s| s.duration() > 0)
        .map_or(0.0, |s| seconds(s.duration(), s.time_base()))
}

/// Clockwise rotation (0/90/180/270) from the stream's display matrix, the way the
/// `ffmpeg` CLI's autorotate reads it.
fn rotation_of(stream: &ffmpeg::format::stream::Stream) -> u32 {
    use ffmpeg::codec::packet::side_data::Type;
    for side in stream.side_data() {
        if side.kind() != Type::DisplayMatrix {
            continue;
        }
        let data = side.data();
        if data.len() < 36 {
            continue;
        }
        let m: Vec<f64> = data[..36]
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        return rotation_from_matrix(&m);
    }
    0
}

/// The display matrix's rotation as clockwise degrees, snapped to a quarter turn.
fn rotation_from_matrix(m: &[f64]) -> u32 {
    let s0 = m[0].hypot(m[3]);
    let s1 = m[1].hypot(m[4]);
    if s0 == 0.0 || s1 == 0.0 {
        return 0;
    }
    let degrees = (m[1] / s1).atan2(m[0] / s0).to_degrees();
    let quarter = (degrees / 90.0).round() as i64;
    (quarter.rem_euclid(4) * 90) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `ffmpeg -y -loglevel error ARGS… DIR/NAME` (a fixture) and returns the file.
    fn ffmpeg_cli(dir: &Path, name: &str, args: &[&str]) -> std::path::PathBuf {
        let out = dir.join(name);
        let made = std::process::Command::new("ffmpeg")
            .args(["-y", "-loglevel", "error"])
            .args(args)
            .arg(&out)
            .status()
            .expect("this test needs the ffmpeg CLI (apt-get install ffmpeg)");
        assert!(made.success(), "ffmpeg failed making {name}");
        out
    }

    /// Matrices as FFmpeg's `av_display_rotation_set(deg)` writes them (16.16 fixed); the
    /// `ffmpeg` CLI turns such a stream `deg` degrees clockwise to show it upright.
    fn matrix_for_clockwise(deg: f64) -> Vec<f64> {
        let r = (-deg).to_radians();
        let one = 65536.0;
        vec![
            r.cos() * one,
            -r.sin() * one,
            0.0,
            r.sin() * one,
            r.cos() * one,
            0.0,
            0.0,
            0.0,
            1073741824.0,
        ]
    }

    #[test]
    fn display_matrix_rotation_is_read_as_clockwise_quarter_turns() {
        assert_eq!(rotation_from_matrix(&matrix_for_clockwise(0.0)), 0);
        assert_eq!(rotation_from_matrix(&matrix_for_clockwise(90.0)), 90);
        assert_eq!(rotation_from_matrix(&matrix_for_clockwise(180.0)), 180);
        assert_eq!(rotation_from_matrix(&matrix_for_clockwise(270.0)), 270);
    }

    /// The registry's `needs_video` decides: an audio-only source is refused by a kind
    /// that needs video, with what it has, and taken by one that does not.
    #[test]
    fn needs_video_decides_whether_an_audio_only_source_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let audio = ffmpeg_cli(
            dir.path(),
            "audio.m4a",
            &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac"],
        );
        let limits = MediaLimits::default();
        let loudness = TaskKind {
            name: "loudness",
            message: "LoudnessJob",
            needs_video: false,
            fans_out: false,
            role: "loudness",
        };
        assert_eq!(Needs::of(&crate::tasks::TRANSCODE), Needs::Video);
        assert_eq!(Needs::of(&loudness), Needs::AudioOrVideo);

        let refused = |err: anyhow::Error| {
            let reason = crate::JobError::classify(err).to_string();
            assert_eq!(reason, "source has no video stream (it has: audio aac)");
        };
        refused(open(&audio, &limits).err().expect("refused"));
        refused(
            open_streams(&audio, &limits, Needs::of(&crate::tasks::TRANSCODE))
                .err()
                .expect("refused"),
        );
        let streams = open_streams(&audio, &limits, Needs::of(&loudness)).expect("taken");
        assert!(streams.info.video.is_none());
        let a = streams.info.audio.as_ref().expect("audio described");
        assert_eq!((a.codec.as_str(), a.sample_rate), ("aac", 44100));
        assert!(
            (streams.info.duration_s - 1.0).abs() < 0.1,
            "{}",
            streams.info.duration_s
        );
        refused(streams.into_source().err().expect("no video, no Source"));

        let srt = dir.path().join("subs.srt");
        std::fs::write(&srt, "1\n00:00:00,000 --> 00:00:01,000\nhello\n").unwrap();
        let subs = ffmpeg_cli(dir.path(), "subs.mkv", &["-i", srt.to_str().unwrap()]);
        let err = open_streams(&subs, &limits, Needs::AudioOrVideo)
            .err()
            .expect("no audio, no video: refused");
        assert_eq!(
            err.to_string(),
            "source has no audio or video stream (it has: subtitle ass)"
        );
    }

    /// The probe describes streams from their parameters alone; what it says is what the
    /// one decoder, opened later, sees.
    #[test]
    fn the_description_from_parameters_is_what_the_decoder_sees() {
        let dir = tempfile::tempdir().unwrap();
        let clip = ffmpeg_cli(
            dir.path(),
            "clip.mp4",
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=320x240:rate=25:duration=1",
                "-f",
                "lavfi",
                "-i",
                "sine=duration=1:sample_rate=48000",
                "-vf",
                "setsar=4/3",
                "-pix_fmt",
                "yuv422p",
                "-c:v",
                "libx264",
                "-c:a",
                "aac",
                "-ac",
                "2",
                "-shortest",
            ],
        );
        let source = open(&clip, &MediaLimits::default()).unwrap();
        let (video, audio) = (&source.info.video, source.info.audio.as_ref().unwrap());
        assert_eq!((video.width, video.height), (320, 240));
        assert_eq!((video.display_width, video.display_height), (427, 240));
        assert_eq!(video.pixel_format, "yuv422p");
        assert_eq!((audio.sample_rate, audio.channels), (48000, 2));

        let decoder = source.decoder(1).unwrap();
        let d = &decoder.decoder;
        assert_eq!((d.width(), d.height()), (video.width, video.height));
        assert_eq!(
            format!("{:?}", d.format()).to_lowercase(),
            video.pixel_format
        );
        assert_eq!(d.aspect_ratio(), ffmpeg::Rational::new(4, 3));
        let a = source.audio_decoder(audio).unwrap();
        assert_eq!(
            (a.rate(), a.channels()),
            (audio.sample_rate, audio.channels)
        );
    }

    #[test]
    fn dimension_limit_names_both_sizes() {
        let video = VideoInfo {
            index: 0,
            codec: "h264".into(),
            width: 7680,
            height: 4320,
            display_width: 7680,
            display_height: 4320,
            rotation: 0,
            frame_rate: 30.0,
            pixel_format: "yuv420p".into(),
        };
        let limits = MediaLimits::default();
        let err = limits
            .check_picture("source", video.width, video.height)
            .unwrap_err();
        assert_eq!(err.to_string(), "source is 7680x4320, limit is 3840x2160");
        assert!(limits.check_picture("source", 2160, 3840).is_ok());
    }

    #[test]
    fn extreme_pixel_aspect_ratios_are_refused_both_ways() {
        let limits = MediaLimits::default();
        assert!(limits.check_pixel_aspect("source", 8, 9).is_ok());
        assert!(limits.check_pixel_aspect("source", 4, 3).is_ok());
        assert!(
            limits.check_pixel_aspect("source", 0, 1).is_ok(),
            "unset is square"
        );
        let err = limits.check_pixel_aspect("source", 1, 100).unwrap_err();
        assert!(err.to_string().contains("1:100"), "{err}");
        assert!(limits.check_pixel_aspect("source", 65535, 1).is_err());
    }
}
