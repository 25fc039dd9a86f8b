//! Measuring a child process for the benchmarks: wall time, CPU time (user + system, of
//! the child and its threads) and peak resident memory (`VmHWM`, sampled from `/proc`
//! while it runs), so our pipeline and the `ffmpeg` CLI are measured the same way,
//! process start included.

use std::process::Command;
use std::time::{Duration, Instant};

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: Duration,
    pub cpu: Duration,
    pub peak_rss_kib: u64,
}

impl Measured {
    /// Runs one after another: times add up, memory is the highest peak.
    pub fn sequence(runs: &[Measured]) -> Measured {
        Measured {
            wall: runs.iter().map(|m| m.wall).sum(),
            cpu: runs.iter().map(|m| m.cpu).sum(),
            peak_rss_kib: runs.iter().map(|m| m.peak_rss_kib).max().unwrap_or(0),
        }
    }
}

/// CPU time of this process's reaped children so far (`cutime + cstime` of
/// `/proc/self/stat`, in clock ticks of 1/100 s: Linux's fixed `USER_HZ`). A child's time
/// is the difference across its run; exact, unlike sampling the child before it exits.
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a /proc stat line")
        .1
        .split_whitespace()
        .collect();
    let ticks = |field: usize| fields[field - 3].parse::<u64>().expect("a tick count");
    Duration::from_millis((ticks(16) + ticks(17)) * 10)
}

/// Runs `cmd` to completion (it must succeed) and measures it.
pub fn run(what: &str, cmd: &mut Command) -> Measured {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    assert!(status.success(), "{what} failed: {status:?}");
    Measured {
        wall,
        cpu: children_cpu() - cpu_before,
        peak_rss_kib: peak,
    }
}

/// The fastest of `n` runs (wall, with that run's CPU time), with the highest peak
/// memory seen.
pub fn best_of(n: usize, what: &str, mut make: impl FnMut() -> Command) -> Measured {
    let runs: Vec<Measured> = (0..n).map(|_| run(what, &mut make())).collect();
    let fastest = runs.iter().min_by_key(|m| m.wall).expect("n > 0");
    Measured {
        peak_rss_kib: runs.iter().map(|m| m.peak_rss_kib).max().expect("n > 0"),
        ..*fastest
    }
}

/// Prints one comparison line.
pub fn report(name: &str, ours: Measured, baseline: Measured, baseline_name: &str) {
    println!(
        "{name}: vidpipe {:.2} s / {:.2} s CPU / {} MiB, {baseline_name} {:.2} s / {:.2} s CPU / {} MiB -> wall ratio {:.2}, CPU ratio {:.2}, memory ratio {:.2}",
        ours.wall.as_secs_f64(),
        ours.cpu.as_secs_f64(),
        ours.peak_rss_kib / 1024,
        baseline.wall.as_secs_f64(),
        baseline.cpu.as_secs_f64(),
        baseline.peak_rss_kib / 1024,
        ours.wall.as_secs_f64() / baseline.wall.as_secs_f64(),
        ours.cpu.as_secs_f64() / baseline.cpu.as_secs_f64().max(1e-9),
        ours.peak_rss_kib as f64 / baseline.peak_rss_kib.max(1) as f64,
    );
}

/// Makes a test clip with the `ffmpeg` CLI unless it exists (libx264 `veryfast` with its
/// default keyframe interval: 250 frames, 8.3 s at 30 fps).
pub fn clip(path: &std::path::Path, seconds: u32, size: &str) {
    clip_with(path, seconds, size, &[]);
}

/// [`clip`] with more encoder arguments, e.g. `["-g", "60"]` for a keyframe every 2 s.
pub fn clip_with(path: &std::path::Path, seconds: u32, size: &str, extra: &[&str]) {
    if path.exists() {
        return;
    }
    let status = Command::new("ffmpeg")
        .args([
            "-y",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc2=size={size}:rate=30:duration={seconds}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
        ])
        .args(extra)
        .arg(path)
        .status()
        .expect("the benchmark needs the ffmpeg CLI");
    assert!(status.success(), "making the benchmark clip failed");
}
