//! Getting the frame shown at a given time, cheaply: one [`Grabber`] (a
//! [`shared::media::Source`] and its decoder) serves one lane of a job, that is one
//! time-ordered run of targets; a job runs a lane per core (see [`crate::pipeline`]), plus
//! one keyframes-only pass for a fast sprite.
//!
//! The frame at `t` is the last one whose timestamp is at or before `t` (what a player
//! shows at that moment). Requests come in ascending time. When the container has a
//! keyframe index (MP4, MKV, WebM, …; read once per job and shared by the lanes) the
//! grabber seeks exactly when the keyframe before `t` lies beyond what it has decoded, and
//! otherwise decodes forward from where it is, so neighbouring thumbnails never decode the
//! same stretch twice and nothing between them is decoded for nothing. Without an index
//! (MPEG-TS) it learns the keyframe interval from the packets it reads and seeks when `t`
//! is more than one interval ahead. While it is still far from `t` it tells the decoder to
//! skip frames nothing refers to (B-frames), which are most of a typical H.264 stream.
//!
//! In keyframes-only mode (fast sprites for long videos) only keyframe packets reach the
//! decoder at all.

use std::sync::Arc;

use ffmpeg::codec::discard::Discard;
use ffmpeg::{Packet, frame};
use ffmpeg_next as ffmpeg;
use shared::media::{Source, VideoDecoder, keyframe_before, seconds};

/// Skip non-reference frames while more than this many seconds before the target.
const SKIP_MARGIN_S: f64 = 0.2;

/// Which frame a request wants.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// The frame shown at the time: the last one at or before it.
    ShownAt,
    /// The first frame at or after the time, less this tolerance in seconds.
    From(f64),
}

pub struct Grabber<'a> {
    src: &'a mut Source,
    decoder: VideoDecoder,
    /// Stream start, subtracted so that time 0 is the start of the video.
    offset_s: f64,
    keyframes_only: bool,
    /// The newest decoded frame at or before the current target.
    held: frame::Video,
    held_s: Option<f64>,
    /// A frame decoded past the previous target, kept for the next one.
    ahead: frame::Video,
    ahead_s: Option<f64>,
    /// Time of the newest decoded frame, for deciding whether to seek.
    position_s: Option<f64>,
    /// Keyframe times from the container's index (empty without one), shared by every
    /// grabber of the source.
    keyframes: Arc<[f64]>,
    /// Last keyframe packet seen and the longest keyframe interval seen so far.
    last_key_s: Option<f64>,
    gop_s: f64,
    eof: bool,
    /// Frames decoded so far (for the manifest and benchmarks).
    pub decoded: u64,
}

impl<'a> Grabber<'a> {
    /// A grabber on `src` whose decoder runs `threads` threads (0: one per core);
    /// `keyframes_only` decodes keyframes alone.
    pub fn new(src: &'a mut Source, threads: usize, keyframes_only: bool) -> anyhow::Result<Self> {
        let mut decoder = src.decoder(threads)?;
        if keyframes_only {
            decoder.decoder.skip_frame(Discard::NonKey);
        }
        let offset_s = src.video_start_s();
        let keyframes = src.keyframes();
        Ok(Self {
            src,
            decoder,
            offset_s,
            keyframes,
            keyframes_only,
            held: frame::Video::empty(),
            held_s: None,
            ahead: frame::Video::empty(),
            ahead_s: None,
            position_s: None,
            last_key_s: None,
            gop_s: 0.0,
            eof: false,
            decoded: 0,
        })
    }

    /// The frame shown at `t` seconds, or `None` when the video has no frame at all.
    /// Calls must come in ascending `t` (a smaller `t` restarts with a seek).
    pub fn frame_at(
        &mut self,
        t: f64,
        cancelled: &dyn Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<&frame::Video>> {
        self.grab(t, Want::ShownAt, cancelled)
    }

    /// The first frame at or after `t` (within `tolerance` seconds before it), or the last
    /// frame when the video ends first. Cheaper than [`Self::frame_at`]: frames nothing
    /// refers to are skipped right up to `t`, since none before `t` can be the answer.
    /// For a sprite tile, which may show any frame of its time range.
    pub fn frame_from(
        &mut self,
        t: f64,
        tolerance: f64,
        cancelled: &dyn Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<&frame::Video>> {
        self.grab(t, Want::From(tolerance), cancelled)
    }

    fn grab(
        &mut self,
        t: f64,
        want: Want,
        cancelled: &dyn Fn() -> anyhow::Result<()>,
    ) -> anyhow::Result<Option<&frame::Video>> {
        // Until a keyframe interval is known, assume a short one: a wrong guess costs
        // at most one interval of decoding again.
        let interval = if self.gop_s > 0.0 { self.gop_s } else { 1.0 };
        let keyframe = keyframe_before(&self.keyframes, t);
        let seek = match (self.held_s, self.position_s, keyframe) {
            (Some(h), _, _) if t < h && want == Want::ShownAt => true,
            // Seeking pays exactly when the keyframe before `t` is past what we decoded.
            (_, Some(p), Some(k)) => k > p + 1e-3,
            (_, None, Some(k)) => k > 1e-3,
            (_, Some(p), None) => t - p > interval,
            (_, None, None) => t > interval,
        };
        if seek {
            self.seek(t);
        }
        // The first frame that answers: for `ShownAt` the one after the answer (which is
        // then the frame held before it), for `From` the answer itself.
        let (past, margin) = match want {
            Want::ShownAt => (t + 1e-6, SKIP_MARGIN_S),
            Want::From(tolerance) => (t - tolerance, 0.0),
        };
        let from = matches!(want, Want::From(_));
        if from && self.held_s.is_some_and(|h| h >= past) {
            return Ok(Some(&self.held));
        }
        // The frame decoded past the previous target may be the one for this target.
        if let Some(a) = self.ahead_s {
            if a <= t || self.held_s.is_none() || from {
                std::mem::swap(&mut self.held, &mut self.ahead);
                self.held_s = Some(a);
                self.ahead_s = None;
            }
            if a > t || (from && a >= past) {
                return Ok(Some(&self.held));
            }
        }
        let mut frame = frame::Video::empty();
        loop {
            cancelled()?;
            if !self.next_frame(&mut frame, t - margin)? {
                break;
            }
            let ft = self
                .decoder
                .frame_seconds(&frame)
                .map(|s| s - self.offset_s);
            let ft = ft.unwrap_or_else(|| self.position_s.map_or(0.0, |p| p + 1e-3));
            self.position_s = Some(ft);
            if !from && ft > past && self.held_s.is_some() {
                self.ahead = frame;
                self.ahead_s = Some(ft);
                return Ok(Some(&self.held));
            }
            std::mem::swap(&mut self.held, &mut frame);
            self.held_s = Some(ft);
            if ft > past || (from && ft >= past) {
                // For `ShownAt`: the very first frame is already past `t`, so it is what
                // is shown.
                return Ok(Some(&self.held));
            }
        }
        Ok(self.held_s.map(|_| &self.held))
    }

    /// Time of the frame [`Self::frame_at`] returned last.
    pub fn held_seconds(&self) -> Option<f64> {
        self.held_s
    }

    /// Seeks to the keyframe at or before `t`. A failed seek (unseekable input) leaves
    /// everything as it was: decoding on from here still reaches `t`.
    fn seek(&mut self, t: f64) {
        if self.src.seek(t + self.offset_s) {
            self.decoder.flush();
            self.held_s = None;
            self.ahead_s = None;
            self.position_s = None;
            self.eof = false;
        }
    }

    /// Decodes the next frame into `frame`; `false` at the end of the stream. Frames
    /// nothing refers to are skipped while their time is before `skip_before`.
    fn next_frame(&mut self, frame: &mut frame::Video, skip_before: f64) -> anyhow::Result<bool> {
        let mut packet = Packet::empty();
        let mut packets = self.src.packets();
        loop {
            if self.decoder.receive(frame)? {
                self.decoded += 1;
                return Ok(true);
            }
            if self.eof {
                return Ok(false);
            }
            if !packets.read(&mut packet).map_err(|c| c.error(None))? {
                self.eof = true;
                self.decoder.send_eof();
                continue;
            }
            if packet.stream() != self.decoder.stream_index {
                continue;
            }
            if packet.is_key()
                && let Some(pt) = packet.pts()
            {
                let pt = seconds(pt, self.decoder.time_base) - self.offset_s;
                if let Some(last) = self.last_key_s.filter(|l| pt > *l) {
                    self.gop_s = self.gop_s.max(pt - last);
                }
                self.last_key_s = Some(pt);
            }
            if self.keyframes_only {
                if !packet.is_key() {
                    continue;
                }
            } else {
                let far = packet
                    .pts()
                    .map(|p| seconds(p, self.decoder.time_base) - self.offset_s)
                    .is_some_and(|pt| pt < skip_before);
                self.decoder.decoder.skip_frame(if far {
                    Discard::NonReference
                } else {
                    Discard::Default
                });
            }
            self.decoder.send(&packet)?;
        }
    }
}

impl Grabber<'_> {
    /// The decoder, for building scalers that match its frames.
    pub fn decoder(&self) -> &ffmpeg::decoder::Video {
        &self.decoder.decoder
    }

    /// Time base of the decoded frames' timestamps.
    pub fn time_base(&self) -> ffmpeg::Rational {
        self.decoder.time_base
    }
}
