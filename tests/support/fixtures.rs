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

/// A small H.264/AAC MP4: `seconds` long, `w`x`h`, 25 fps, with a tone.
pub fn sample_mp4(dir: &Path, name: &str, seconds: u32, w: u32, h: u32) -> PathBuf {
    let video = format!("testsrc2=size={w}x{h}:rate=25:duration={seconds}");
    let audio = format!("sine=frequency=440:duration={seconds}");
    ffmpeg(
        dir,
        name,
        &[
            "-f",
            "lavfi",
            "-i",
            &video,
            "-f",
            "lavfi",
            "-i",
            &audio,
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
        ],
    )
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
