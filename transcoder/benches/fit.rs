//! Fitted-ladder benchmark: `ladder: auto` against the fixed ladder (the baseline,
//! measured in the same run) on a generated mixed set: a still slide, a talking head (a
//! still frame with a small moving region), high motion and noisy motion. Prints, per
//! clip and rung: bytes, luma PSNR and SSIM against the source (the `ffmpeg` CLI's
//! `psnr`/`ssim` filters, independent of the probe's own measure), bits saved; per clip
//! the probe's time as a fraction of the fixed transcode's. Not a pass/fail test.
//!
//! `cargo bench -p transcoder --bench fit` (release build; a few minutes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use shared::messages::{LadderMode, OutputFormat, TranscodeJob};
use shared::storage_key::StorageKey;
use shared::{Handler, JobContext, TaskOutput};
use tokio_util::sync::CancellationToken;
use transcoder::TranscodeHandler;

/// Seconds per clip: long enough that the probe takes its share, short enough to run
/// four clips twice in a few minutes on two cores.
const SECONDS: u32 = 30;
const SIZE: &str = "1280x720";

/// The mixed set: name and `ffmpeg` lavfi graph (all at 25 fps).
fn clips() -> [(&'static str, String); 4] {
    let d = SECONDS;
    [
        (
            "still slide",
            format!("testsrc=size={SIZE}:rate=25,loop=loop=-1:size=1:start=0,trim=duration={d}"),
        ),
        (
            "talking head",
            format!(
                "testsrc=size={SIZE}:rate=25,loop=loop=-1:size=1:start=0,trim=duration={d}[bg];\
                 testsrc2=size=320x240:rate=25:duration={d}[fg];[bg][fg]overlay=480:240"
            ),
        ),
        (
            "high motion",
            format!(
                "testsrc2=size={SIZE}:rate=25:duration={d},scroll=horizontal=0.02:vertical=0.01"
            ),
        ),
        (
            "noise",
            format!("testsrc2=size={SIZE}:rate=25:duration={d},noise=alls=20:allf=t+u"),
        ),
    ]
}

fn main() {
    let dir = std::env::temp_dir().join("vidpipe-bench-fit");
    std::fs::create_dir_all(&dir).unwrap();
    shared::media::init();
    let handler = TranscodeHandler::default();
    let cfg = &handler.settings;
    println!(
        "fitted ladder vs fixed (libx264 {} crf {}), {SECONDS} s {SIZE} clips, default ladder, MP4; \
         target SSIM {}, CRF {}..={}, {} x {} s samples (at most {:.0}% of the source)",
        cfg.preset,
        cfg.crf,
        cfg.fit_target_ssim,
        cfg.fit_crf_min,
        cfg.fit_crf_max,
        cfg.fit_samples,
        cfg.fit_sample_secs,
        cfg.fit_max_share * 100.0
    );
    println!(
        "{:<13} {:<6} {:>10} {:>7} {:>8} | {:>10} {:>7} {:>8} {:>4} {:>6} | {:>7}",
        "clip", "rung", "fixed B", "PSNR", "SSIM", "auto B", "PSNR", "SSIM", "CRF", "cap", "saved"
    );
    for (name, graph) in clips() {
        let source = dir.join(format!("{}.mp4", name.replace(' ', "-")));
        make_clip(&source, &graph);
        let (fixed, fixed_s) = transcode(&handler, &source, &dir.join("fixed"), LadderMode::Fixed);
        let (auto, auto_s) = transcode(&handler, &source, &dir.join("auto"), LadderMode::Auto);
        let fit = &auto.summary["ladder_fit"];
        let (mut fixed_total, mut auto_total) = (0u64, 0u64);
        for f in fixed.files.iter().filter(|f| f.meta["format"] == "mp4") {
            let rung = f.meta["rendition"].as_str().unwrap_or_default();
            let (w, h) = (
                f.meta["width"].as_u64().unwrap(),
                f.meta["height"].as_u64().unwrap(),
            );
            let fixed_bytes = std::fs::metadata(&f.path).unwrap().len();
            let (fp, fs) = quality(&f.path, &source, w, h);
            fixed_total += fixed_bytes;
            let kept = auto
                .files
                .iter()
                .find(|a| a.meta["format"] == "mp4" && a.meta["rendition"] == rung);
            match kept {
                Some(a) => {
                    let bytes = std::fs::metadata(&a.path).unwrap().len();
                    auto_total += bytes;
                    let (ap, as_) = quality(&a.path, &source, w, h);
                    let chosen = fit["rungs"]
                        .as_array()
                        .and_then(|r| r.iter().find(|r| r["name"] == rung))
                        .cloned()
                        .unwrap_or(Value::Null);
                    println!(
                        "{name:<13} {rung:<6} {fixed_bytes:>10} {fp:>7.2} {fs:>8.5} | {bytes:>10} {ap:>7.2} {as_:>8.5} {:>4} {:>6} | {:>6.1}%",
                        // JSON numbers ignore widths: printed as text.
                        chosen["crf"].to_string(),
                        chosen["cap_kbps"].to_string(),
                        saved(fixed_bytes, bytes)
                    );
                }
                None => {
                    let why = fit["dropped"]
                        .as_array()
                        .and_then(|d| d.iter().find(|d| d["name"] == rung))
                        .map(|d| d["reason"].as_str().unwrap_or_default().to_owned())
                        .unwrap_or_default();
                    println!(
                        "{name:<13} {rung:<6} {fixed_bytes:>10} {fp:>7.2} {fs:>8.5} | dropped: {why}"
                    );
                }
            }
        }
        let probe_s = fit["probe_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<13} ladder {fixed_total:>10} bytes fixed, {auto_total:>10} auto: {:.1}% saved; \
             transcode {fixed_s:.1} s fixed, {auto_s:.1} s auto of which probe {probe_s:.1} s = \
             {:.2} of the fixed transcode",
            saved(fixed_total, auto_total),
            probe_s / fixed_s
        );
    }
}

fn saved(fixed: u64, auto: u64) -> f64 {
    (1.0 - auto as f64 / fixed.max(1) as f64) * 100.0
}

/// The clip, made once by the `ffmpeg` CLI: near-lossless (CRF 10) so the source is what
/// the outputs are measured against, with a keyframe every 2 s.
fn make_clip(path: &Path, graph: &str) {
    if path.exists() {
        return;
    }
    let status = Command::new("ffmpeg")
        .args([
            "-y",
            "-hide_banner",
            "-loglevel",
            "error",
            "-filter_complex",
        ])
        .arg(graph)
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "10", "-g", "50", "-pix_fmt",
            "yuv420p",
        ])
        .arg(path)
        .status()
        .expect("the benchmark needs the ffmpeg CLI");
    assert!(status.success(), "making {}", path.display());
}

/// Our handler, in this process, on `source` into a fresh `out`; its output and wall time.
fn transcode(
    handler: &TranscodeHandler,
    source: &Path,
    out: &Path,
    ladder: LadderMode,
) -> (TaskOutput, f64) {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).unwrap();
    let job = TranscodeJob {
        job_id: uuid::Uuid::nil(),
        source: StorageKey::new("bench/source").unwrap(),
        output_prefix: StorageKey::new("bench/out/").unwrap(),
        renditions: Vec::new(),
        formats: vec![OutputFormat::Mp4],
        codecs: vec![shared::messages::VideoCodec::H264],
        segments: shared::messages::Segmenting::Off,
        ladder,
        part: None,
    };
    let ctx = JobContext::standalone(source, &PathBuf::from(out), CancellationToken::new());
    let started = Instant::now();
    let output = handler.handle(&job, &ctx).expect("our transcode failed");
    let elapsed = started.elapsed().as_secs_f64();
    // Keep the files: the caller measures them before the next run replaces them.
    (output, elapsed)
}

/// Luma PSNR (dB) and SSIM of `encoded` against `source` scaled to `w`x`h` (bilinear,
/// as the transcoder scales), by the `ffmpeg` CLI.
fn quality(encoded: &Path, source: &Path, w: u64, h: u64) -> (f64, f64) {
    let graph = format!(
        "[1:v]scale={w}:{h}:flags=bilinear,split[r1][r2];[0:v]split[e1][e2];\
         [e1][r1]psnr;[e2][r2]ssim"
    );
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostats", "-i"])
        .arg(encoded)
        .arg("-i")
        .arg(source)
        .args(["-lavfi", &graph, "-f", "null", "-"])
        .output()
        .expect("ffmpeg");
    let text = String::from_utf8_lossy(&out.stderr);
    let after = |tag: &str| -> f64 {
        text.lines()
            .filter(|l| l.contains(if tag == " y:" { "PSNR" } else { "SSIM" }))
            .find_map(|l| l.split(tag).nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (after(" y:"), after(" Y:"))
}
