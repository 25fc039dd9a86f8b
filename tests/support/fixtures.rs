//! Tiny fixture videos made at test time with the `ffmpeg` CLI (the workers themselves
//! never run it; tests use it only to make inputs and `ffprobe` to check outputs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `ffmpeg -y -loglevel error <args> <out>` and returns `out`.
pub fn ffmpeg(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-y", "-hide_banner", "-loglevel", "error"])
        .args(args)
        .arg(&out)
        .status()
        .expect("the tests need the ffmpeg CLI (apt-get install ffmpeg)");
    assert!(status.success(), "ffmpeg failed making {name}");
    out
}

/// The fixtures' H.264 encoder settings: fast, and 4:2:0 as players expect.
const X264: [&str; 6] = [
    "-c:v",
    "libx264",
    "-preset",
    "ultrafast",
    "-pix_fmt",
    "yuv420p",
];

/// A small H.264/AAC MP4: `seconds` long, `w`x`h`, 25 fps, with a tone.
pub fn sample_mp4(dir: &Path, name: &str, seconds: u32, w: u32, h: u32) -> PathBuf {
    let video = format!("testsrc2=size={w}x{h}:rate=25:duration={seconds}");
    let audio = format!("sine=frequency=440:duration={seconds}");
    let mut args = vec!["-f", "lavfi", "-i", &video, "-f", "lavfi", "-i", &audio];
    args.extend(X264);
    args.extend(["-c:a", "aac", "-shortest"]);
    ffmpeg(dir, name, &args)
}

/// A video-only H.264 clip of `testsrc2` at `size` (`WxH`), 25 fps, `seconds` long, with
/// `extra` output options (`-vf setsar=1/100`, `-f h264`, …); the container follows `name`.
pub fn x264_clip(dir: &Path, name: &str, size: &str, seconds: u32, extra: &[&str]) -> PathBuf {
    let src = format!("testsrc2=size={size}:rate=25:duration={seconds}");
    let mut args = vec!["-f", "lavfi", "-i", &src];
    args.extend_from_slice(extra);
    args.extend(X264);
    ffmpeg(dir, name, &args)
}

/// `ffprobe -show_format -show_streams` as JSON.
pub fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
        ])
        .arg(path)
        .output()
        .expect("the tests need ffprobe (apt-get install ffmpeg)");
    assert!(out.status.success(), "ffprobe failed on {}", path.display());
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// Runs `ffmpeg` with `args` and the output `name` in `dir`, for fixtures made from
/// filter graphs (`-filter_complex …`).
pub fn lavfi(dir: &Path, name: &str, graph: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["-filter_complex", graph];
    args.extend_from_slice(extra);
    ffmpeg(dir, name, &args)
}

/// A copy of `src` whose video is flagged as rotated 90° (as phones record portrait
/// video): same pixels, a display matrix that says "turn me".
pub fn rotated(dir: &Path, src: &Path, name: &str) -> PathBuf {
    let src = src.to_str().expect("utf-8 path");
    ffmpeg(
        dir,
        name,
        &["-i", src, "-c", "copy", "-metadata:s:v:0", "rotate=90"],
    )
}

/// Presentation times of the video keyframes of `path`, in seconds.
pub fn keyframe_times(path: &Path) -> Vec<f64> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts_time,flags",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe");
    let mut times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, flags) = l.split_once(',')?;
            flags.contains('K').then(|| t.parse().ok())?
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// The first video frame of `path` as the `ffmpeg` CLI shows it (autorotated), RGB.
pub fn first_frame_rgb(dir: &Path, path: &Path, name: &str) -> image::RgbImage {
    let src = path.to_str().expect("utf-8 path");
    let png = ffmpeg(dir, name, &["-i", src, "-frames:v", "1"]);
    image::open(png).expect("PNG").to_rgb8()
}

/// An 8-second 320x240 H.264/AAC clip with a keyframe every second (a source with one
/// keyframe is not split: every segment would decode it from the start).
pub fn segmentable_clip(dir: &Path) -> PathBuf {
    ffmpeg(
        dir,
        "clip.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=8",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=8",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
        ],
    )
}

/// A still "slide": the first frame of `testsrc` (bars, digits, a gradient) held for
/// `seconds` at 25 fps, `w`x`h`, video only: the easiest content there is.
pub fn still_slide(dir: &Path, name: &str, seconds: u32, w: u32, h: u32) -> PathBuf {
    let frames = (seconds * 25).to_string();
    let src = format!("testsrc=size={w}x{h}:rate=25,loop=loop=-1:size=1:start=0");
    let mut args = vec!["-f", "lavfi", "-i", &src, "-frames:v", &frames];
    args.extend(X264);
    ffmpeg(dir, name, &args)
}

/// Grey with strong uniform noise changing every frame, `seconds` at 25 fps, `w`x`h`,
/// video only: the hardest content there is (nothing to predict), coded near losslessly
/// so the noise survives into the source.
pub fn noise_clip(dir: &Path, name: &str, seconds: u32, w: u32, h: u32) -> PathBuf {
    let src =
        format!("color=c=gray:size={w}x{h}:rate=25:duration={seconds},noise=alls=60:allf=t+u");
    let mut args = vec!["-f", "lavfi", "-i", &src];
    args.extend(X264);
    args.extend(["-crf", "12"]);
    ffmpeg(dir, name, &args)
}

/// Luma SSIM of `encoded` against `reference` (same size), by the `ffmpeg` CLI's `ssim`
/// filter: the measure the fitted ladder targets, taken independently of it.
pub fn ssim_y(encoded: &Path, reference: &Path) -> f64 {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostats", "-i"])
        .arg(encoded)
        .arg("-i")
        .arg(reference)
        .args(["-lavfi", "[0:v][1:v]ssim", "-f", "null", "-"])
        .output()
        .expect("the tests need the ffmpeg CLI");
    assert!(
        out.status.success(),
        "ffmpeg ssim failed on {}",
        encoded.display()
    );
    let text = String::from_utf8_lossy(&out.stderr);
    text.rsplit(" Y:")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no SSIM in ffmpeg's output:\n{text}"))
}
