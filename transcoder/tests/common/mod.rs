//! Helpers for tests of segmented transcoding against the single pass: fixtures made with
//! the `ffmpeg` CLI (tests only; the workers never run it), both transcodes run in-process
//! on local files, and `ffprobe`/`ffmpeg` reads of what came out.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use shared::JobContext;
use shared::media::{self, MediaLimits};
use shared::messages::{OutputFormat, Rendition, TranscodeJob};
use shared::storage_key::StorageKey;
use tokio_util::sync::CancellationToken;
use transcoder::encode::Finished;
use transcoder::ladder::{self, Planned};
use transcoder::{
    AudioPart, SegmentParts, SegmentRange, TranscoderSettings, encode_audio, encode_segment,
    plan_ranges, stitch,
};

/// A fresh directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("vidpipe-seg-tests")
        .join(format!("{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `ffmpeg -y -loglevel error <args> <dir/name>` and returns the output path.
pub fn ffmpeg(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-y", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .arg(&out)
        .status()
        .expect("the tests need the ffmpeg CLI");
    assert!(status.success(), "ffmpeg failed making {name}");
    out
}

/// Settings for small fixtures: a keyframe and an HLS segment every second (so a 2 s
/// segment length cuts a few seconds of video into several segments), the default x264
/// preset (B-frames on), two threads.
pub fn settings() -> TranscoderSettings {
    TranscoderSettings {
        keyframe_interval_s: 1.0,
        hls_segment_s: 1.0,
        threads: 2,
        ..TranscoderSettings::default()
    }
}

/// Two renditions of a 320x240 source: its own size and a smaller one, with two audio
/// bit rates (so the audio step encodes twice).
pub fn two_renditions() -> Vec<Rendition> {
    vec![
        Rendition {
            name: "240p".into(),
            height: 240,
            video_kbps: 600,
            audio_kbps: 96,
        },
        Rendition {
            name: "180p".into(),
            height: 180,
            video_kbps: 400,
            audio_kbps: 64,
        },
    ]
}

/// The ladder `renditions` gives for `source`.
pub fn plan_for(source: &Path, renditions: &[Rendition]) -> Vec<Planned> {
    media::init();
    let src = media::open(source, &MediaLimits::default()).expect("source opens");
    let v = &src.info.video;
    ladder::plan(renditions, v.display_width, v.display_height).0
}

fn job(renditions: &[Rendition], formats: &[OutputFormat]) -> TranscodeJob {
    TranscodeJob {
        job_id: uuid::Uuid::nil(),
        source: StorageKey::new("local/source").unwrap(),
        output_prefix: StorageKey::new("local/out/").unwrap(),
        renditions: renditions.to_vec(),
        formats: formats.to_vec(),
        codecs: vec![shared::messages::VideoCodec::H264],
        segments: Default::default(),
        ladder: Default::default(),
        part: None,
    }
}

fn ctx(source: &Path, dir: &Path) -> JobContext {
    std::fs::create_dir_all(dir).unwrap();
    JobContext::standalone(source, dir, CancellationToken::new())
}

/// The single pass of `source` into `out`.
pub fn single_pass(
    source: &Path,
    out: &Path,
    renditions: &[Rendition],
    formats: &[OutputFormat],
    cfg: &TranscoderSettings,
) {
    media::init();
    transcoder::pipeline::transcode(
        &job(renditions, formats),
        &ctx(source, out),
        cfg,
        &MediaLimits::default(),
    )
    .expect("single pass");
}

/// The ranges of `source` at `segment_s`, which must be splittable.
pub fn ranges(source: &Path, segment_s: f64, cfg: &TranscoderSettings) -> Vec<SegmentRange> {
    media::init();
    plan_ranges(
        source,
        &MediaLimits::default(),
        segment_s,
        cfg.hls_segment_s,
    )
    .expect("planning")
    .expect("the source splits")
}

/// Every step of a segmented transcode, each in a scratch directory of its own as
/// different workers would run them (under `work`), the stitch into `out`.
pub fn segmented(
    source: &Path,
    work: &Path,
    out: &Path,
    renditions: &[Rendition],
    formats: &[OutputFormat],
    cfg: &TranscoderSettings,
    segment_s: f64,
) -> (Vec<SegmentRange>, Vec<Finished>) {
    let limits = MediaLimits::default();
    let plan = plan_for(source, renditions);
    let ranges = ranges(source, segment_s, cfg);
    assert!(ranges.len() >= 3, "expected several segments: {ranges:?}");
    let segments: Vec<SegmentParts> = ranges
        .iter()
        .map(|r| {
            let dir = work.join(format!("seg-{}", r.index));
            let parts = encode_segment(source, r, &plan, cfg, &limits, &ctx(source, &dir))
                .unwrap_or_else(|e| panic!("segment {}: {e:#}", r.index));
            SegmentParts {
                range: r.clone(),
                parts,
            }
        })
        .collect();
    let kbps: Vec<u32> = plan.iter().map(|p| p.audio_kbps).collect();
    let audio: Vec<AudioPart> = encode_audio(
        source,
        &kbps,
        cfg,
        &limits,
        &ctx(source, &work.join("audio")),
    )
    .expect("audio");
    let finished = stitch(&plan, formats, &segments, &audio, cfg, &ctx(source, out))
        .unwrap_or_else(|e| panic!("stitch: {e:#}"));
    (ranges, finished)
}

/// `ffprobe` of one stream's entries as CSV rows.
pub fn probe_rows(path: &Path, stream: &str, entries: &str) -> Vec<Vec<String>> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", stream, "-show_entries"])
        .arg(entries)
        .args(["-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe");
    assert!(out.status.success(), "ffprobe failed on {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|f| f.trim().to_owned()).collect())
        .collect()
}

/// Presentation times (seconds) of the video frames of `path`, in presentation order.
pub fn video_times(path: &Path) -> Vec<f64> {
    let mut t: Vec<f64> = probe_rows(path, "v:0", "packet=pts_time")
        .iter()
        .filter_map(|r| r.first()?.parse().ok())
        .collect();
    t.sort_by(f64::total_cmp);
    t
}

/// `(start, end)` seconds of the stream `stream` (`v:0`, `a:0`) of `path`: first packet
/// time, last packet time plus its duration.
pub fn span(path: &Path, stream: &str) -> Option<(f64, f64)> {
    let rows = probe_rows(path, stream, "packet=pts_time,duration_time");
    let mut start = f64::INFINITY;
    let mut end = f64::NEG_INFINITY;
    for r in &rows {
        let pts: f64 = r.first()?.parse().ok()?;
        let d: f64 = r.get(1).and_then(|d| d.parse().ok()).unwrap_or(0.0);
        start = start.min(pts);
        end = end.max(pts + d);
    }
    start.is_finite().then_some((start, end))
}

/// The container duration `ffprobe` reports.
pub fn duration(path: &Path) -> f64 {
    let rows = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe");
    String::from_utf8_lossy(&rows.stdout)
        .trim()
        .parse()
        .expect("a duration")
}

/// A fixture whose every frame carries its own index `N` (0-255) as two flat grey
/// halves, `16 + (N mod 16) * 14` on the left and `16 + (N / 16) * 14` on the right:
/// survives x264 at any sane quality and comes back by averaging each half.
pub fn indexed_clip(dir: &Path, name: &str, seconds: u32, fps: u32, extra: &[&str]) -> PathBuf {
    assert!(seconds * fps <= 256, "the index holds 256 frames");
    let src = format!(
        "color=c=black:s=320x240:r={fps}:d={seconds},format=yuv420p,\
         geq=lum='if(lt(X,W/2),16+mod(N,16)*14,16+floor(N/16)*14)':cb=128:cr=128"
    );
    let tone = format!("sine=frequency=440:duration={seconds}");
    let mut args = vec!["-f", "lavfi", "-i", &src, "-f", "lavfi", "-i", &tone];
    args.extend_from_slice(extra);
    args.extend(["-c:v", "libx264", "-preset", "veryfast", "-crf", "18"]);
    args.extend(["-c:a", "aac", "-shortest"]);
    ffmpeg(dir, name, &args)
}

/// The frame indices of an [`indexed_clip`] (or any rendition of one) as decoded by the
/// `ffmpeg` CLI, every frame in presentation order (no frame dropped or repeated for
/// rate).
pub fn frame_indices(path: &Path) -> Vec<u32> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args([
            "-map",
            "0:v:0",
            "-fps_mode",
            "passthrough",
            "-vf",
            "scale=2:2:flags=area,format=yuv420p",
            "-f",
            "rawvideo",
            "-",
        ])
        .output()
        .expect("ffmpeg");
    assert!(out.status.success(), "decoding {} failed", path.display());
    // 2x2 luma, then one byte each of U and V: the top row is the two halves.
    out.stdout
        .chunks_exact(6)
        .map(|px| {
            let digit = |v: u8| ((f64::from(v) - 16.0) / 14.0).round().clamp(0.0, 15.0) as u32;
            digit(px[0]) + 16 * digit(px[1])
        })
        .collect()
}

/// Average PSNR (dB, luma+chroma as the `psnr` filter's `average`) of `a` against
/// `reference`.
pub fn psnr(a: &Path, reference: &Path) -> f64 {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-i"])
        .arg(a)
        .arg("-i")
        .arg(reference)
        .args(["-lavfi", "[0:v][1:v]psnr", "-f", "null", "-"])
        .output()
        .expect("ffmpeg");
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .rfind(|l| l.contains("PSNR") && l.contains("average:"))
        .unwrap_or_else(|| panic!("no PSNR in {log}"));
    line.split("average:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("an average")
}

/// The media playlists' segments of a rendition's HLS output: `(file, EXTINF seconds)`.
pub fn hls_segments(playlist: &Path) -> Vec<(PathBuf, f64)> {
    let text = std::fs::read_to_string(playlist).expect("playlist");
    let dir = playlist.parent().unwrap();
    let mut pending = None;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#EXTINF:") {
            pending = rest.split(',').next().and_then(|d| d.trim().parse().ok());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            out.push((dir.join(line.trim()), pending.take().unwrap_or(0.0)));
        }
    }
    out
}
