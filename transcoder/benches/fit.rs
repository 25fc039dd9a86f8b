//! Fitted-ladder benchmark: `ladder: auto` against the fixed ladder (the baseline,
//! measured in the same run) on a generated mixed set: a still slide, a talking head (a
//! still frame with a small moving region), high motion and noisy motion. Prints, per
//! clip and rung: bytes, luma PSNR and SSIM against the source (the `ffmpeg` CLI's
//! `psnr`/`ssim` filters, independent of the probe's own measure), bits saved; per clip
//! the probe's time as a fraction of the fixed transcode's.
//!
//! Bits saved at CRF 23 mix a rate change with a quality change (the fitted ladder gives
//! back quality the fixed one had in surplus), so a second table compares at equal
//! quality, BD-rate style: the fixed ladder is also encoded at CRF 26, 29 and 32 (same
//! caps, MP4 only), and its bytes at the SSIM, then at the PSNR, each auto rung reached
//! are interpolated on that curve (linear in log bytes over the metric, between the two
//! neighbouring CRFs; "outside range" rather than extrapolated). The ladder row takes
//! total bytes at the bytes-weighted mean quality of its rungs. Not a pass/fail test.
//!
//! `cargo bench -p transcoder --bench fit` (release build; about 13 minutes on two shared cores).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use shared::messages::{LadderMode, OutputFormat, TranscodeJob};
use shared::storage_key::StorageKey;
use shared::{Handler, JobContext, TaskOutput};
use tokio_util::sync::CancellationToken;
use transcoder::TranscodeHandler;

/// Seconds per clip: long enough that the probe takes its share (one 2 s sample, as at
/// 30 s), short enough to run four clips six times (fixed, auto, three more CRFs) in
/// about 13 minutes on two shared cores.
const SECONDS: u32 = 20;
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
        "fitted ladder vs fixed (libx264 {} crf {}), {SECONDS} s {SIZE} clips (shortened from \
         30 s to keep the fixed curve's extra encodes within the run), default ladder, MP4; \
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
    // The equal-quality table, printed after the baseline one.
    let mut equal = Vec::new();
    for (name, graph) in clips() {
        let source = dir.join(format!("{}.mp4", name.replace(' ', "-")));
        make_clip(&source, &graph);
        let (fixed_out, fixed_s) =
            transcode(&handler, &source, &dir.join("fixed"), LadderMode::Fixed);
        let fixed = measure(&fixed_out, &source);
        let (auto_out, auto_s) = transcode(&handler, &source, &dir.join("auto"), LadderMode::Auto);
        let auto = measure(&auto_out, &source);
        let fit = &auto_out.summary["ladder_fit"];
        let (mut fixed_total, mut auto_total) = (0u64, 0u64);
        for f in &fixed {
            let rung = f.rung.as_str();
            fixed_total += f.bytes;
            match auto.iter().find(|a| a.rung == rung) {
                Some(a) => {
                    auto_total += a.bytes;
                    let chosen = fit["rungs"]
                        .as_array()
                        .and_then(|r| r.iter().find(|r| r["name"] == rung))
                        .cloned()
                        .unwrap_or(Value::Null);
                    println!(
                        "{name:<13} {rung:<6} {:>10} {:>7.2} {:>8.5} | {:>10} {:>7.2} {:>8.5} {:>4} {:>6} | {:>6.1}%",
                        f.bytes,
                        f.psnr,
                        f.ssim,
                        a.bytes,
                        a.psnr,
                        a.ssim,
                        // JSON numbers ignore widths: printed as text.
                        chosen["crf"].to_string(),
                        chosen["cap_kbps"].to_string(),
                        saved(f.bytes as f64, a.bytes as f64)
                    );
                }
                None => {
                    let why = fit["dropped"]
                        .as_array()
                        .and_then(|d| d.iter().find(|d| d["name"] == rung))
                        .map(|d| d["reason"].as_str().unwrap_or_default().to_owned())
                        .unwrap_or_default();
                    println!(
                        "{name:<13} {rung:<6} {:>10} {:>7.2} {:>8.5} | dropped: {why}",
                        f.bytes, f.psnr, f.ssim
                    );
                }
            }
        }
        let probe_s = fit["probe_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<13} ladder {fixed_total:>10} bytes fixed, {auto_total:>10} auto: {:.1}% saved; \
             transcode {fixed_s:.1} s fixed, {auto_s:.1} s auto of which probe {probe_s:.1} s = \
             {:.2} of the fixed transcode",
            saved(fixed_total as f64, auto_total as f64),
            probe_s / fixed_s
        );

        // The fixed ladder's own rate-quality curve: the same ladder and caps at more CRFs
        // (MP4 only, like everything here). Its first point is the run above.
        let mut curve = vec![(cfg.crf, fixed)];
        for crf in CURVE_CRFS {
            let mut at = handler.clone();
            at.settings.crf = crf;
            let (out, _) = transcode(&at, &source, &dir.join("curve"), LadderMode::Fixed);
            curve.push((crf, measure(&out, &source)));
        }
        equal.extend(equal_quality(name, &curve, &auto));
    }
    println!(
        "\nat equal quality: the fixed ladder's bytes at the SSIM (PSNR) the auto rung reached, \
         interpolated on the fixed ladder's own curve (CRF {} {}; same caps) linearly in \
         log(bytes) over the metric between the two neighbouring CRFs, never extrapolated; \
         ladder: total bytes at the bytes-weighted mean of its rungs' metric (auto: its kept \
         rungs, so a dropped rung counts as bytes saved)",
        cfg.crf,
        CURVE_CRFS.map(|c| c.to_string()).join(" "),
    );
    println!(
        "{:<13} {:<6} {:>10} {:>10} | {:>10} {:>8} | {:>10} {:>8} | fixed curve (CRF: bytes SSIM PSNR)",
        "clip", "rung", "auto B", "fixed B", "@SSIM B", "saved", "@PSNR B", "saved"
    );
    for line in equal {
        println!("{line}");
    }
}

/// The fixed ladder's extra CRFs, besides the configured one (23): enough to span the
/// SSIM the fitted ladder lands at on easy content (its CRF goes up to `fit_crf_max`, 32).
const CURVE_CRFS: [u8; 3] = [26, 29, 32];

/// One MP4 rendition of a transcode, measured against the source.
#[derive(Clone)]
struct Rendition {
    rung: String,
    bytes: u64,
    psnr: f64,
    ssim: f64,
}

/// Every MP4 rendition of `output`: its size and quality.
fn measure(output: &TaskOutput, source: &Path) -> Vec<Rendition> {
    output
        .files
        .iter()
        .filter(|f| f.meta["format"] == "mp4")
        .map(|f| {
            let (w, h) = (
                f.meta["width"].as_u64().unwrap(),
                f.meta["height"].as_u64().unwrap(),
            );
            let (psnr, ssim) = quality(&f.path, source, w, h);
            Rendition {
                rung: f.meta["rendition"].as_str().unwrap_or_default().to_owned(),
                bytes: std::fs::metadata(&f.path).unwrap().len(),
                psnr,
                ssim,
            }
        })
        .collect()
}

/// The equal-quality rows of one clip: per rung the auto ladder kept, then the ladder.
/// `curve` is the fixed ladder at each CRF, the configured one first.
fn equal_quality(name: &str, curve: &[(u8, Vec<Rendition>)], auto: &[Rendition]) -> Vec<String> {
    let ssim = |r: &Rendition| r.ssim;
    let psnr = |r: &Rendition| r.psnr;
    let mut rows = Vec::new();
    for a in auto {
        // (bytes, SSIM, PSNR) of this rung at each CRF, in CRF order.
        let points: Vec<Rendition> = curve
            .iter()
            .filter_map(|(_, run)| run.iter().find(|f| f.rung == a.rung).cloned())
            .collect();
        rows.push(row(name, a, curve, &points, ssim, psnr));
    }
    // The ladder as one rendition: total bytes, bytes-weighted mean quality.
    let whole = |rung: &[Rendition]| {
        let bytes: u64 = rung.iter().map(|r| r.bytes).sum();
        let mean = |m: fn(&Rendition) -> f64| {
            rung.iter().map(|r| r.bytes as f64 * m(r)).sum::<f64>() / bytes.max(1) as f64
        };
        Rendition {
            rung: "ladder".into(),
            bytes,
            psnr: mean(psnr),
            ssim: mean(ssim),
        }
    };
    let points: Vec<Rendition> = curve.iter().map(|(_, run)| whole(run)).collect();
    rows.push(row(name, &whole(auto), curve, &points, ssim, psnr));
    rows
}

/// One equal-quality row: `auto` against the fixed `points` (one per `curve` CRF, first
/// = CRF 23) at auto's SSIM and at its PSNR, then the points themselves.
fn row(
    name: &str,
    auto: &Rendition,
    curve: &[(u8, Vec<Rendition>)],
    points: &[Rendition],
    ssim: impl Fn(&Rendition) -> f64,
    psnr: impl Fn(&Rendition) -> f64,
) -> String {
    let at = |metric: &dyn Fn(&Rendition) -> f64| {
        let line: Vec<(f64, f64)> = points.iter().map(|p| (metric(p), p.bytes as f64)).collect();
        match bytes_at(&line, metric(auto)) {
            Some(fixed) => format!("{:>10.0} {:>7.1}%", fixed, saved(fixed, auto.bytes as f64)),
            None => format!("{:>19}", "outside range"),
        }
    };
    let base = points.first().map_or(0, |p| p.bytes);
    let shown = curve
        .iter()
        .zip(points)
        .map(|((crf, _), p)| format!("{crf}: {} {:.5} {:.2}", p.bytes, p.ssim, p.psnr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{name:<13} {:<6} {:>10} {base:>10} | {} | {} | {shown}",
        auto.rung,
        auto.bytes,
        at(&ssim),
        at(&psnr)
    )
}

/// The fixed ladder's bytes at quality `target`, on a curve of (quality, bytes) points in
/// CRF order: linear in log(bytes) between the two neighbouring points that bracket it
/// (rate-quality curves are close to straight in log rate, as BD-rate assumes), or `None`
/// when no two do: outside the curve, a claim would be an extrapolation. Where the cap
/// binds the curve need not be monotonic (on noise a lower CRF can score lower) and may
/// cross `target` more than once: the cheapest crossing is taken, so a saving is never
/// overstated.
fn bytes_at(curve: &[(f64, f64)], target: f64) -> Option<f64> {
    let crossings = curve.windows(2).filter_map(|pair| {
        let [(q0, b0), (q1, b1)] = [pair[0], pair[1]];
        if !(q0.min(q1)..=q0.max(q1)).contains(&target) {
            return None;
        }
        // Two CRFs can give the same encode when the cap binds: take the cheaper.
        if (q1 - q0).abs() < 1e-12 {
            return Some(b0.min(b1));
        }
        let t = (target - q0) / (q1 - q0);
        Some((b0.ln() + t * (b1.ln() - b0.ln())).exp())
    });
    crossings.min_by(f64::total_cmp)
}

fn saved(fixed: f64, auto: f64) -> f64 {
    (1.0 - auto / fixed.max(1.0)) * 100.0
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
