//! The last step of a segmented transcode: each rendition's segment parts and the audio
//! part of its bit rate, copied (no re-encoding) into the same MP4 and HLS muxers the
//! single pass writes, so the outputs have the same names, options and layout and
//! `pipeline::collect_outputs` lists them as it lists a single pass's.
//!
//! Nothing is published unless every check holds:
//!
//! - every part is what its facts say (frames, first and last timestamps) and each
//!   segment has the frames its plan counted, starting on a keyframe;
//! - at every seam, no gap and no overlap: each segment's frames lie in its range, and the
//!   next segment's first frame comes after this one's last; the total is the plan's;
//! - every part of a rendition has the same time base and the same SPS/PPS (one encoder
//!   setting), or the stitched stream would not decode as one;
//! - the video and the audio start and end where the source's do (within one frame).
//!
//! A part that does not match its own facts is transient (it came through storage; another
//! attempt may fetch it whole). Anything else is a bug in how the parts were made, and
//! permanent: publishing it would publish a broken video.

use anyhow::Context as _;
use ffmpeg::{Packet, Rational};
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};
use shared::JobContext;
use shared::media::seconds;
use shared::messages::OutputFormat;
use shared::permanent;

use crate::encode::{AAC_FRAME_SIZE, AudioEncoder, Finished, Muxers, PacketStats, frame_duration};
use crate::hls;
use crate::ladder::Planned;
use crate::parts::{PartReader, clear_codec_tag};
use crate::segment_encode::{AudioPart, PartFile};
use crate::segments::SegmentRange;
use crate::settings::TranscoderSettings;

/// One encoded segment: its planned range and the part of each rendition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentParts {
    pub range: SegmentRange,
    pub parts: Vec<PartFile>,
}

/// Stitches every rendition of `plan` from `segments` (in timeline order) and the audio
/// part of its bit rate (none when `audio` is empty: the source has no audio) into the
/// containers `formats` asks for, under `ctx.scratch_dir()`.
pub fn stitch(
    plan: &[Planned],
    formats: &[OutputFormat],
    segments: &[SegmentParts],
    audio: &[AudioPart],
    cfg: &TranscoderSettings,
    ctx: &JobContext,
) -> anyhow::Result<Vec<Finished>> {
    if segments.is_empty() {
        return Err(permanent("stitch: no segments"));
    }
    for (k, s) in segments.iter().enumerate() {
        if s.range.index as usize != k {
            return Err(permanent(format!(
                "stitch: segment {} is at position {k}",
                s.range.index
            )));
        }
    }
    let mut finished = Vec::with_capacity(plan.len());
    for (i, p) in plan.iter().enumerate() {
        let parts = segments
            .iter()
            .map(|s| {
                s.parts
                    .iter()
                    .find(|f| f.rendition == p.name)
                    .ok_or_else(|| {
                        permanent(format!(
                            "stitch: segment {} has no part for rendition {}",
                            s.range.index, p.name
                        ))
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sound = if audio.is_empty() {
            None
        } else {
            Some(
                audio
                    .iter()
                    .find(|a| a.kbps == p.audio_kbps)
                    .ok_or_else(|| {
                        permanent(format!(
                            "stitch: no audio part at {} kbit/s for rendition {}",
                            p.audio_kbps, p.name
                        ))
                    })?,
            )
        };
        let done = stitch_rendition(p, formats, segments, &parts, sound, cfg, ctx)
            .with_context(|| format!("rendition {}", p.name))?;
        finished.push(done);
        ctx.progress((i + 1) as f64 / plan.len() as f64 * 100.0);
    }
    Ok(finished)
}

/// What pass one learnt of a rendition's parts.
struct Survey {
    /// Every frame's presentation timestamp, in timeline order.
    pts: Vec<i64>,
    /// The reorder depth: how many packets a frame is decoded ahead of being shown, at
    /// most. Decoding timestamps are derived from it.
    delay: usize,
    time_base: Rational,
    frame_rate: Rational,
    params: ffmpeg::codec::Parameters,
}

/// One rendition: its parts surveyed and checked, then copied (with its audio) into its
/// containers, decoding times rebuilt.
fn stitch_rendition(
    plan: &Planned,
    formats: &[OutputFormat],
    segments: &[SegmentParts],
    parts: &[&PartFile],
    audio: Option<&AudioPart>,
    cfg: &TranscoderSettings,
    ctx: &JobContext,
) -> anyhow::Result<Finished> {
    let survey = survey(segments, parts, ctx)?;
    let tb = survey.time_base;
    let frame = frame_duration(survey.frame_rate, tb);
    let level = hls::h264_level(plan.width, plan.height, f64::from(survey.frame_rate));

    let mut video_params = survey.params.clone();
    clear_codec_tag(&mut video_params);
    let mut sound = match audio {
        Some(a) => Some(open_sound(a, cfg)?),
        None => None,
    };
    let mut muxers = Muxers::open(
        &plan.name,
        cfg,
        &video_params,
        tb,
        sound.as_ref().map(|s| (&s.params, s.time_base)),
        formats,
        ctx.scratch_dir()?,
    )?;

    let mut stats = PacketStats::default();
    let mut g = 0usize; // global decoding index
    let mut last_dts: Option<i64> = None;
    for part in parts {
        let mut reader = PartReader::open(&part.path)?;
        while let Some(mut packet) = reader.next()? {
            ctx.check_cancelled()?;
            let pts = packet.pts().context("video packet without a timestamp")?;
            let dts = decoding_time(&survey.pts, survey.delay, g);
            // By construction dts <= pts and strictly increasing across seams; a part
            // that breaks it was not made by one encoder setting.
            if dts > pts || last_dts.is_some_and(|l| dts <= l) {
                return Err(permanent(format!(
                    "seam error: frame {g} would decode at {dts} after being shown at {pts}, or \
                     out of order (previous {last_dts:?})"
                )));
            }
            last_dts = Some(dts);
            packet.set_dts(Some(dts));
            packet.set_duration(frame);
            if let Some(s) = sound.as_mut() {
                s.copy_until(seconds(dts, tb), &mut muxers)?;
            }
            stats.add(&packet);
            muxers.write(&packet, false, tb)?;
            g += 1;
        }
    }
    if let (Some(s), Some(a)) = (sound.as_mut(), audio) {
        s.copy_until(f64::INFINITY, &mut muxers)?;
        s.check(a)?;
        check_sync(a, &stats, tb, frame)?;
    }
    let files = muxers.finish()?;
    let end = stats.end_pts.unwrap_or(0);
    Ok(Finished {
        plan: plan.clone(),
        // Parts are H.264 only (`segmented::plan` keeps other codecs in one pass).
        codec: shared::messages::VideoCodec::H264,
        level,
        duration_s: seconds(end, tb),
        has_audio: sound.is_some(),
        files,
        part: None,
        video: stats,
    })
}

/// The audio part's packets, ready to copy, with the stream's parameters as the single
/// pass gives them: from an AAC encoder of the same settings (NUT does not keep the
/// encoder's priming, which the MP4 muxer reads from them).
fn open_sound(audio: &AudioPart, cfg: &TranscoderSettings) -> anyhow::Result<AudioCopy> {
    let reader = PartReader::open(&audio.path)?;
    let encoder = AudioEncoder::open(audio.kbps, cfg.audio_sample_rate)?;
    let params = ffmpeg::codec::Parameters::from(&encoder.encoder);
    AudioCopy::new(audio, reader, params)
}

/// Pass one over a rendition's parts: each is what its facts say and what its segment's
/// plan counted, the seams have no gap or overlap, and the parts fit together as one
/// stream. Returns every frame's timestamp and the reorder depth.
fn survey(
    segments: &[SegmentParts],
    parts: &[&PartFile],
    ctx: &JobContext,
) -> anyhow::Result<Survey> {
    let mut all: Vec<i64> = Vec::new();
    let mut delay = 0usize;
    let mut first: Option<Stream> = None;
    let mut planned = 0u64;
    for (seg, part) in segments.iter().zip(parts) {
        let k = seg.range.index;
        planned += seg.range.frames;
        if part.frames != seg.range.frames {
            return Err(permanent(format!(
                "seam error: segment {k} has {} frames, its plan {}",
                part.frames, seg.range.frames
            )));
        }
        let (order, sorted) = read_part(k, part, &mut first, ctx)?;
        check_range(&seg.range, &sorted, first_tb(&first), first_rate(&first))?;
        if let (Some(prev), Some(now)) = (all.last(), sorted.first())
            && now <= prev
        {
            return Err(permanent(format!(
                "seam error: segment {k} starts at {now}, not after segment {}'s last frame \
                 at {prev} (overlap)",
                k.saturating_sub(1)
            )));
        }
        // How far ahead of its presentation slot each packet is decoded.
        for (i, pts) in order.iter().enumerate() {
            let shown = sorted.partition_point(|p| p < pts);
            delay = delay.max(i.saturating_sub(shown));
        }
        all.extend(sorted);
    }
    if all.len() as u64 != planned {
        return Err(permanent(format!(
            "seam error: {} frames in all, planned {planned}",
            all.len()
        )));
    }
    let first = first.expect("at least one segment");
    let frame_rate = first
        .frame_rate
        .context("the video part does not record its frame rate")?;
    Ok(Survey {
        pts: all,
        delay,
        time_base: first.time_base,
        frame_rate,
        params: first.params,
    })
}

/// What every part of one rendition must share with the first: one stream.
struct Stream {
    time_base: Rational,
    frame_rate: Option<Rational>,
    params: ffmpeg::codec::Parameters,
    /// SPS/PPS: parts encoded with other settings differ here.
    extradata: Vec<u8>,
}

fn first_tb(first: &Option<Stream>) -> Rational {
    first.as_ref().map_or(Rational::new(1, 1), |f| f.time_base)
}

fn first_rate(first: &Option<Stream>) -> Option<Rational> {
    first.as_ref().and_then(|f| f.frame_rate)
}

/// Reads one part of segment `k`: checks it is the file its facts describe (else
/// transient: a partial download), shares one stream with the first part (recorded in
/// `first` when there is none yet), starts on a keyframe and shows no two frames at one
/// time. Its timestamps in decoding order, and sorted.
fn read_part(
    k: u32,
    part: &PartFile,
    first: &mut Option<Stream>,
    ctx: &JobContext,
) -> anyhow::Result<(Vec<i64>, Vec<i64>)> {
    let mut reader = PartReader::open(&part.path)?;
    let tb = reader.time_base;
    if (tb.numerator(), tb.denominator()) != part.time_base {
        anyhow::bail!(
            "part {} has time base {tb}, its facts say {}/{}",
            part.path.display(),
            part.time_base.0,
            part.time_base.1
        );
    }
    let extradata = reader.extradata();
    match first {
        None => {
            *first = Some(Stream {
                time_base: tb,
                frame_rate: reader.frame_rate,
                params: reader.params.clone(),
                extradata,
            });
        }
        Some(f) if f.time_base != tb => {
            return Err(permanent(format!(
                "seam error: segment {k} has time base {tb}, segment 0 {}",
                f.time_base
            )));
        }
        Some(f) if f.extradata != extradata => {
            return Err(permanent(format!(
                "seam error: segment {k} was encoded with other settings (its SPS/PPS \
                 differ from segment 0's)"
            )));
        }
        Some(_) => {}
    }
    // Decoding order as stored; presentation order is the sorted timestamps.
    let mut order: Vec<i64> = Vec::with_capacity(part.frames as usize);
    let mut first_key = None;
    while let Some(packet) = reader.next()? {
        ctx.check_cancelled()?;
        if first_key.is_none() {
            first_key = Some(packet.is_key());
        }
        order.push(packet.pts().unwrap_or_default());
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    let (got_first, got_last) = (sorted.first().copied(), sorted.last().copied());
    if order.len() as u64 != part.frames
        || got_first != Some(part.first_pts)
        || got_last != Some(part.last_pts)
    {
        // Transient: the file is not the one its facts describe (a partial download).
        anyhow::bail!(
            "part {} holds {} frames from {got_first:?} to {got_last:?}; its facts say {} \
             from {} to {}",
            part.path.display(),
            order.len(),
            part.frames,
            part.first_pts,
            part.last_pts
        );
    }
    if first_key != Some(true) {
        return Err(permanent(format!(
            "seam error: segment {k} does not start on a keyframe"
        )));
    }
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(permanent(format!(
            "seam error: segment {k} shows two frames at one time"
        )));
    }
    Ok((order, sorted))
}

/// Each frame of a segment lies in its range (within half a frame of its bounds, for a
/// part whose time base is finer than the source's).
fn check_range(
    range: &SegmentRange,
    sorted: &[i64],
    tb: Rational,
    rate: Option<Rational>,
) -> anyhow::Result<()> {
    let half = rate.map_or(0, |r| frame_duration(r, tb) / 2);
    let (start, end) = range.bounds(tb);
    let (Some(first), Some(last)) = (sorted.first(), sorted.last()) else {
        return Err(permanent(format!(
            "seam error: segment {} has no frames",
            range.index
        )));
    };
    if start.is_some_and(|s| *first < s - half) || end.is_some_and(|e| *last >= e + half) {
        return Err(permanent(format!(
            "seam error: segment {} has frames from {:.3} s to {:.3} s, outside its range \
             {:.3}..{:?}",
            range.index,
            seconds(*first, tb),
            seconds(*last, tb),
            range.start_s,
            range.end_s
        )));
    }
    Ok(())
}

/// The decoding timestamp of the `g`th packet (decoding order) of a stream whose frames
/// are shown at `pts` (sorted) and decoded at most `delay` packets ahead: the timestamp
/// of the frame shown `delay` places earlier, as x264 itself stamps them (its first
/// `delay` packets are shifted back by the time the first `delay` frames span).
///
/// The parts do not keep x264's decoding times (see [`crate::parts`]). Deriving them for
/// the whole rendition at once also settles the seams: each segment's encoder started its
/// own clock, and its first decoding times, shifted back from its first frame, could fall
/// before the previous segment's last ones. Here they are the previous segment's last
/// presentation times, strictly increasing and never after a frame's own presentation.
fn decoding_time(pts: &[i64], delay: usize, g: usize) -> i64 {
    if delay == 0 {
        return pts[g];
    }
    if g >= delay {
        return pts[g - delay];
    }
    let span = match pts.get(delay) {
        Some(p) => p - pts[0],
        None => (pts[pts.len() - 1] - pts[0]).max(delay as i64),
    };
    pts[g] - span
}

/// The audio part being copied alongside a rendition's video.
struct AudioCopy {
    reader: PartReader,
    params: ffmpeg::codec::Parameters,
    time_base: Rational,
    end_pts: i64,
    /// The packet read but not yet written (its duration is known once the next comes).
    pending: Option<Packet>,
    stats: PacketStats,
    done: bool,
}

impl AudioCopy {
    fn new(
        part: &AudioPart,
        reader: PartReader,
        params: ffmpeg::codec::Parameters,
    ) -> anyhow::Result<Self> {
        let time_base = reader.time_base;
        if (time_base.numerator(), time_base.denominator()) != part.time_base {
            anyhow::bail!(
                "audio part {} has time base {time_base}, its facts say {}/{}",
                part.path.display(),
                part.time_base.0,
                part.time_base.1
            );
        }
        Ok(Self {
            reader,
            params,
            time_base,
            end_pts: part.end_pts,
            pending: None,
            stats: PacketStats::default(),
            done: false,
        })
    }

    /// Writes the audio packets that start before `until_s`.
    fn copy_until(&mut self, until_s: f64, muxers: &mut Muxers) -> anyhow::Result<()> {
        loop {
            if self.pending.is_none() {
                if self.done {
                    return Ok(());
                }
                match self.reader.next()? {
                    Some(p) => self.pending = Some(p),
                    None => {
                        self.done = true;
                        return Ok(());
                    }
                }
            }
            let pending = self.pending.as_ref().expect("just read");
            let pts = pending.pts().unwrap_or_default();
            if seconds(pts, self.time_base) >= until_s {
                return Ok(());
            }
            let mut packet = self.pending.take().expect("just read");
            let next = if self.done { None } else { self.reader.next()? };
            let end = match &next {
                Some(n) => n.pts().unwrap_or(pts),
                None => {
                    self.done = true;
                    self.end_pts
                }
            };
            packet.set_dts(Some(pts));
            packet.set_duration((end - pts).max(0));
            self.stats.add(&packet);
            muxers.write(&packet, true, self.time_base)?;
            self.pending = next;
        }
    }

    /// The audio written is the part its facts describe.
    fn check(&self, part: &AudioPart) -> anyhow::Result<()> {
        let s = &self.stats;
        if s.packets != part.packets
            || s.first_pts != Some(part.first_pts)
            || s.last_pts != Some(part.last_pts)
        {
            anyhow::bail!(
                "audio part {} holds {} packets from {:?} to {:?}; its facts say {} from {} to {}",
                part.path.display(),
                s.packets,
                s.first_pts,
                s.last_pts,
                part.packets,
                part.first_pts,
                part.last_pts
            );
        }
        Ok(())
    }
}

/// The stitched video starts and ends on the source's first and last frames, and the
/// audio where the source's audio does (its first sample after the encoder's priming),
/// each within one frame.
fn check_sync(
    audio: &AudioPart,
    video: &PacketStats,
    tb: Rational,
    frame: i64,
) -> anyhow::Result<()> {
    let frame_s = seconds(frame, tb) + 1e-3;
    let (Some(first), Some(last)) = (video.first_pts, video.last_pts) else {
        return Err(permanent("seam error: no video frames"));
    };
    let a_tb = Rational::new(audio.time_base.0, audio.time_base.1);
    let priming = seconds(i64::from(AAC_FRAME_SIZE), a_tb);
    let checks = [
        ("video start", seconds(first, tb), audio.source_video_s.0),
        ("video end", seconds(last, tb), audio.source_video_s.1),
        (
            "audio start",
            seconds(audio.first_pts, a_tb) + priming,
            audio.source_audio_s.0,
        ),
        (
            "audio end",
            seconds(audio.end_pts, a_tb),
            audio.source_audio_s.1,
        ),
    ];
    for (what, got, source) in checks {
        if (got - source).abs() > frame_s {
            return Err(permanent(format!(
                "sync error: stitched {what} at {got:.3} s, the source's at {source:.3} s"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_times_follow_presentation_with_the_reorder_delay() {
        let pts: Vec<i64> = (0..6).map(|i| i * 10).collect();
        let dts: Vec<i64> = (0..6).map(|g| decoding_time(&pts, 2, g)).collect();
        assert_eq!(dts, [-20, -10, 0, 10, 20, 30]);
        let dts: Vec<i64> = (0..3).map(|g| decoding_time(&pts, 0, g)).collect();
        assert_eq!(dts, [0, 10, 20]);
    }
}
