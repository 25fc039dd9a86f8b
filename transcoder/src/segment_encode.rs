//! The two encoding steps of a segmented transcode, each run by a worker of its own:
//! [`encode_segment`] (one range of the video, every rendition, video only) and
//! [`encode_audio`] (the whole audio, once per bit rate). The stitch
//! ([`crate::stitch`]) copies their part files into the final MP4/HLS outputs.
//!
//! Both run the single pass's own machinery (`pipeline`: the decoder, the upright graph,
//! one thread per rendition scaling from the next larger picture, x264 with the same
//! settings; the audio path resampling once and AAC-encoding once per bit rate) so a
//! stitched rendition is what the single pass would have made, cut where the segments
//! meet. Timestamps stay on the single pass's output timeline (not rebased per segment),
//! so the stitch is a plain copy.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ffmpeg::{Packet, codec};
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};
use shared::JobContext;
use shared::media::{self, MediaLimits, seconds, timestamp};

use crate::encode::{Finished, RenditionOutput};
use crate::ladder::Planned;
use crate::parts::{PartWriter, discarded};
use crate::pipeline::{self, VideoPath, VideoSetup, Window};
use crate::segments::SegmentRange;
use crate::settings::TranscoderSettings;

/// One rendition of one segment: a video-only part file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartFile {
    pub rendition: String,
    pub path: PathBuf,
    /// Video frames (packets) in the file.
    pub frames: u64,
    /// First and last presentation timestamps, in `time_base`, on the output timeline.
    pub first_pts: i64,
    pub last_pts: i64,
    /// `(numerator, denominator)` of the file's time base.
    pub time_base: (i32, i32),
}

/// The whole audio at one AAC bit rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioPart {
    pub kbps: u32,
    pub path: PathBuf,
    /// AAC packets in the file.
    pub packets: u64,
    /// First and last presentation timestamps, in `time_base`, on the output timeline
    /// (the first is negative by the encoder's priming when the audio starts at 0).
    pub first_pts: i64,
    pub last_pts: i64,
    /// Where the last packet ends (its timestamp plus its duration), in `time_base`.
    pub end_pts: i64,
    pub time_base: (i32, i32),
    /// Where the source's video and audio start and end on the output timeline, seconds,
    /// from their packets (video: first and last frame times; audio: first sample and
    /// end of the last packet). The stitch holds the outputs to them.
    pub source_video_s: (f64, f64),
    pub source_audio_s: (f64, f64),
}

/// Encodes the frames of `range` in every rendition of `plan` (video only), each into
/// `<scratch>/<rendition>.nut`. The first frame of each part is an IDR picture (a fresh
/// encoder), its GOPs are the single pass's (same x264 settings).
///
/// Fails (transient, so it is retried) when a rendition's frame count differs from the
/// plan's: the stitch must never see a segment with a frame missing or repeated.
pub fn encode_segment(
    source: &Path,
    range: &SegmentRange,
    plan: &[Planned],
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
) -> anyhow::Result<Vec<PartFile>> {
    encode_range(source, range, plan, cfg, limits, ctx, seek_points)
}

/// [`encode_segment`] with the seek points `seeks` gives.
fn encode_range(
    source: &Path,
    range: &SegmentRange,
    plan: &[Planned],
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
    seeks: impl Fn(&media::Source, &SegmentRange) -> Vec<f64>,
) -> anyhow::Result<Vec<PartFile>> {
    anyhow::ensure!(!plan.is_empty(), "segment {}: no renditions", range.index);
    let mut src = media::open(source, limits)?;
    let VideoSetup {
        mut decoder,
        upright,
        clock,
    } = VideoSetup::open(&src, cfg)?;
    let (start, end) = range.bounds(clock.time_base);
    let window = Window::new(start, end, seeks(&src, range));
    let mut video = VideoPath::new(&src, clock, upright, Some(window));
    let threads = pipeline::encoder_threads(plan, cfg.threads);
    let outputs = plan
        .iter()
        .zip(threads)
        .map(|(p, t)| RenditionOutput::open_part(p.clone(), cfg, t, clock, ctx.scratch_dir()?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let finished = pipeline::run(&mut src, &mut decoder, &mut video, None, plan, outputs, ctx)
        .with_context(|| format!("segment {}", range.index))?;
    finished.into_iter().map(|f| part_file(range, f)).collect()
}

/// The part file a rendition of `range` wrote, held to the plan's frame count.
fn part_file(range: &SegmentRange, f: Finished) -> anyhow::Result<PartFile> {
    let part = f.part.context("a segment rendition wrote no part file")?;
    let encoded = part.stats.packets;
    if encoded != range.frames {
        // Transient: a retry decodes again (and a plan that miscounted fails every time,
        // until the attempts are spent).
        anyhow::bail!(
            "segment {}: encoded {encoded} frames, planned {} (rendition {})",
            range.index,
            range.frames,
            f.plan.name
        );
    }
    let (Some(first_pts), Some(last_pts)) = (part.stats.first_pts, part.stats.last_pts) else {
        anyhow::bail!("segment {}: no frames in its range", range.index);
    };
    Ok(PartFile {
        rendition: f.plan.name,
        path: part.path,
        frames: encoded,
        first_pts,
        last_pts,
        time_base: (part.time_base.numerator(), part.time_base.denominator()),
    })
}

/// Container times (seconds) to seek to for `range`, tried in turn until one lands on a
/// keyframe at or before its start (`pipeline::Window` checks): the nearest first, from
/// the keyframes the container's index knows at or before the start and from plain times
/// a little, 3 s and 10 s before it (a seek lands on the keyframe at or before its
/// target; an index may be incomplete until the first seek, as Matroska's cues are); last
/// of all the beginning. None for the first range, which decodes from the beginning.
fn seek_points(src: &media::Source, range: &SegmentRange) -> Vec<f64> {
    if range.index == 0 {
        return Vec::new();
    }
    let video_start = src.video_start_s();
    // Keyframe times are from the start of the video; the range's from `start_s()`.
    let start = range.start_s + src.start_s();
    let keyframes = src.keyframes();
    let indexed = keyframes
        .iter()
        .map(|k| k + video_start)
        .filter(|t| *t <= start + 1e-6)
        .rev()
        .take(2);
    let timed = [0.001, 3.0, 10.0].map(|back| start - back);
    let mut seeks: Vec<f64> = indexed.chain(timed).filter(|t| *t > video_start).collect();
    seeks.sort_by(|a, b| b.total_cmp(a));
    seeks.dedup_by(|a, b| (*a - *b).abs() < 1e-3);
    seeks.push(video_start.min(src.start_s()) + 0.001);
    seeks
}

/// Encodes the source's whole audio once per distinct bit rate of `kbps`, each into
/// `<scratch>/aac-<kbps>.nut`: decoded and resampled once, with the single pass's offset
/// (shifted by `Source::start_s()`, so audio that starts late stays late). A source
/// without audio gives no parts.
///
/// The part keeps each AAC packet's timestamp exactly, the first one's negative priming
/// included (see [`crate::parts`]); the stitch copies them into the same muxers the
/// single pass writes, which turn the priming into an edit list (MP4) as they do there.
pub fn encode_audio(
    source: &Path,
    kbps: &[u32],
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
) -> anyhow::Result<Vec<AudioPart>> {
    let mut src = media::open(source, limits)?;
    let Some(info) = src.info.audio.clone() else {
        return Ok(Vec::new());
    };
    let mut rates: Vec<u32> = Vec::new();
    for k in kbps {
        if !rates.contains(k) {
            rates.push(*k);
        }
    }
    anyhow::ensure!(!rates.is_empty(), "no audio bit rates to encode");
    let mut audio = pipeline::AudioPath::open(&src, &info, &rates, cfg)?;
    audio.offset = timestamp(src.start_s(), audio.time_base);
    let mut writers = audio
        .encoders
        .iter()
        .map(|e| {
            let path = ctx.scratch_dir()?.join(format!("aac-{}.nut", e.kbps));
            PartWriter::create(
                &path,
                &codec::Parameters::from(&e.encoder),
                e.time_base,
                None,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut sink = |e: usize, packet: Packet| writers[e].write(&packet);

    let v_index = src.info.video.index;
    let v_tb = src.time_base(v_index)?;
    let v_offset = timestamp(src.start_s(), v_tb);
    let a_tb = audio.time_base;
    let duration_s = src.info.duration_s;
    let (mut video_span, mut audio_span) = (Span::default(), Span::default());
    let mut packet = Packet::empty();
    let mut packets = src.packets();
    loop {
        ctx.check_cancelled()?;
        match packets.read(&mut packet) {
            Ok(true) => {}
            Ok(false) => break,
            Err(corrupt) => return Err(corrupt.error(None)),
        }
        if packet.stream() == v_index {
            if let (Some(pts), false) = (packet.pts(), discarded(&packet)) {
                let t = seconds(pts - v_offset, v_tb);
                video_span.add(t, t);
            }
        } else if packet.stream() == audio.index {
            if let Some(pts) = packet.pts() {
                let t = seconds(pts - audio.offset, a_tb);
                audio_span.add(t, t + seconds(packet.duration().max(0), a_tb));
                if duration_s > 0.0 {
                    ctx.progress(t / duration_s * 100.0);
                }
            }
            audio.send(&packet);
            audio.drain(&mut sink)?;
        }
    }
    audio.finish(&mut sink)?;
    let spans = (video_span.get(), audio_span.get());
    let parts = writers
        .into_iter()
        .zip(&rates)
        .map(|(w, kbps)| finish_audio_part(w, *kbps, spans))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ctx.progress(100.0);
    Ok(parts)
}

/// Closes one bit rate's part file and describes it; `spans` are where the source's
/// video and audio start and end (seconds), for the stitch's sync check.
fn finish_audio_part(
    writer: PartWriter,
    kbps: u32,
    (source_video_s, source_audio_s): ((f64, f64), (f64, f64)),
) -> anyhow::Result<AudioPart> {
    let info = writer.finish()?;
    let s = info.stats;
    let (Some(first_pts), Some(last_pts), Some(end_pts)) = (s.first_pts, s.last_pts, s.end_pts)
    else {
        return Err(shared::permanent("source audio has no decodable samples"));
    };
    Ok(AudioPart {
        kbps,
        path: info.path,
        packets: s.packets,
        first_pts,
        last_pts,
        end_pts,
        time_base: (info.time_base.numerator(), info.time_base.denominator()),
        source_video_s,
        source_audio_s,
    })
}

/// The earliest start and latest end of some packets, seconds.
#[derive(Default)]
struct Span(Option<(f64, f64)>);

impl Span {
    fn add(&mut self, start: f64, end: f64) {
        self.0 = Some(match self.0 {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }
    fn get(&self) -> (f64, f64) {
        self.0.unwrap_or((0.0, 0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ladder;
    use crate::segments::plan_ranges;
    use tokio_util::sync::CancellationToken;

    /// A seek that lands after the range's start (an index that lies, a demuxer that
    /// rounds) is caught on the first packet, and the next, earlier seek point is tried:
    /// the segment still has exactly its planned frames.
    #[test]
    fn a_seek_that_lands_late_is_retried_from_earlier() {
        media::init();
        let dir = std::env::temp_dir().join(format!("vidpipe-seek-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("clip.mp4");
        let made = std::process::Command::new("ffmpeg")
            .args(["-y", "-v", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=160x120:rate=25:duration=6")
            .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "25"])
            .arg(&source)
            .status()
            .expect("the tests need the ffmpeg CLI");
        assert!(made.success());
        let limits = MediaLimits::default();
        let cfg = TranscoderSettings {
            keyframe_interval_s: 1.0,
            hls_segment_s: 1.0,
            threads: 1,
            ..TranscoderSettings::default()
        };
        let ranges = plan_ranges(&source, &limits, 2.0, 1.0).unwrap().unwrap();
        let range = &ranges[1];
        let (plan, _) = ladder::plan(&[], 160, 120);
        let ctx = JobContext::standalone(&source, &dir, CancellationToken::new());
        let tried = std::sync::Mutex::new(Vec::new());
        // Past the start first (lands on the keyframe at 3 s), then just before it.
        let late_first = |src: &media::Source, r: &SegmentRange| {
            let seeks = vec![r.start_s + 1.2, r.start_s - 0.001, src.video_start_s()];
            tried.lock().unwrap().extend(seeks.clone());
            seeks
        };
        let parts = encode_range(&source, range, &plan, &cfg, &limits, &ctx, late_first)
            .expect("the segment encodes");
        assert_eq!(parts[0].frames, range.frames);
        assert_eq!(parts[0].frames, 50);
        // Its first frame is the range's first (2 s at 1/12800).
        assert_eq!(parts[0].first_pts, 25_600);
        assert_eq!(tried.lock().unwrap().len(), 3);
    }
}
