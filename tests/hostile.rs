//! Hostile and broken inputs through both real workers: each either yields valid outputs
//! or a dead letter with a clear reason; no worker crashes or hangs; their peak memory
//! stays bounded (measured and printed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::TestEnv;
use crate::support::fixtures;

const PATIENCE: Duration = Duration::from_secs(180);

/// Peak resident memory of a process so far, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Writes the hostile corpus into `dir`: `(name, path)` pairs.
fn corpus(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let clip = fixtures::sample_mp4(dir, "good.mp4", 2, 320, 240);
    let good = std::fs::read(&clip).unwrap();
    let mut seed = 0x9e37_79b9_u32;
    let random: Vec<u8> = (0..200_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
        .collect();
    // A Y4M header claiming a 30000x30000 picture, with one frame's worth of nothing.
    let huge = b"YUV4MPEG2 W30000 H30000 F25:1 Ip A1:1 C420jpeg\nFRAME\n\0\0\0\0";
    // mvhd duration patched to ~49 days (timescale 1000).
    let mut long = good.clone();
    if let Some(at) = long.windows(4).position(|w| w == b"mvhd") {
        let d = at + 4 + 4 + 4 + 4 + 4;
        let ts = u32::from_be_bytes(long[d - 4..d].try_into().unwrap()).max(1);
        let secs = 4_233_600u64; // 49 days
        let v = (secs * u64::from(ts)).min(u64::from(u32::MAX)) as u32;
        long[d..d + 4].copy_from_slice(&v.to_be_bytes());
    }
    let srt = write(
        "subs.srt",
        b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n2\n00:00:01,000 --> 00:00:02,000\nworld\n",
    );
    let subtitles_only = fixtures::ffmpeg(dir, "subtitles.mkv", &["-i", srt.to_str().unwrap()]);
    let audio_only = fixtures::ffmpeg(
        dir,
        "audio.m4a",
        &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac"],
    );
    let mut many = vec!["-i", clip.to_str().unwrap(), "-map", "0:v"];
    many.extend(std::iter::repeat_n(["-map", "0:a"], 300).flatten());
    many.extend(["-c", "copy"]);
    let many_streams = fixtures::ffmpeg(dir, "many-streams.mkv", &many);
    vec![
        ("zero bytes", write("empty.mp4", b"")),
        ("truncated", write("truncated.mp4", &good[..good.len() / 3])),
        ("random bytes", write("random.mp4", &random)),
        (
            "text named .mp4",
            write("text.mp4", "not a video\n".repeat(200).as_bytes()),
        ),
        ("huge dimensions", write("huge.y4m", huge)),
        ("absurd duration", write("long.mp4", &long)),
        ("hundreds of streams", many_streams),
        ("subtitles only", subtitles_only),
        ("audio only", audio_only),
    ]
}

#[tokio::test]
async fn hostile_inputs_end_completed_or_dead_with_a_reason_and_workers_survive() {
    let mut env = TestEnv::new().await;
    let inputs = corpus(env.data.path());
    let transcoder = env.spawn_worker("transcoder", "hostile-transcoder", &[]);
    let thumbnailer = env.spawn_worker("thumbnailer", "hostile-thumbnailer", &[]);
    let mut pending = Vec::new();
    for (name, path) in &inputs {
        for task in ["transcode", "thumbnail"] {
            let (id, prefix) = env.submit_file(task, path, json!({})).await;
            pending.push((*name, task, id, prefix));
        }
    }
    let deadline = Instant::now() + PATIENCE;
    let mut outcome: Vec<(&str, &str, String)> = Vec::new();
    let mut dead = Vec::new();
    while !pending.is_empty() {
        dead.extend(env.take_all(&env.topology.dead()).await);
        let mut still = Vec::new();
        for (name, task, id, prefix) in pending {
            if let Some(m) = env.storage.manifest(&prefix).await.unwrap() {
                for o in m["outputs"].as_array().unwrap() {
                    let path = env.storage_root().join(o["key"].as_str().unwrap());
                    assert!(path.is_file(), "{name}/{task}: listed output missing");
                }
                outcome.push((name, task, "completed".into()));
            } else if let Some(d) = dead.iter().find(|d| {
                serde_json::from_slice::<serde_json::Value>(&d.body).unwrap()["job_id"]
                    == id.to_string()
            }) {
                let reason = d.reason();
                assert!(
                    reason.len() > 15 && reason.contains("source"),
                    "{name}/{task}: unclear reason `{reason}`"
                );
                outcome.push((name, task, format!("dead: {reason}")));
            } else {
                still.push((name, task, id, prefix));
            }
        }
        pending = still;
        assert!(
            Instant::now() < deadline,
            "no outcome within {PATIENCE:?} for {:?}\n{}",
            pending.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (name, task, result) in &outcome {
        println!("hostile: {name:<20} {task:<10} {result}");
    }
    let must_be_dead = [
        "zero bytes",
        "random bytes",
        "text named .mp4",
        "huge dimensions",
        "hundreds of streams",
        "subtitles only",
        "audio only",
    ];
    for (name, task, result) in &outcome {
        if must_be_dead.contains(name) {
            assert!(result.starts_with("dead"), "{name}/{task}: {result}");
        }
    }
    let peaks: Vec<u64> = [transcoder, thumbnailer]
        .into_iter()
        .map(|i| {
            let w = env.worker(i);
            assert!(w.is_running(), "a worker died:\n{}", w.log_text());
            peak_rss_mib(w.pid())
        })
        .collect();
    println!(
        "hostile: peak memory transcoder {} MiB, thumbnailer {} MiB",
        peaks[0], peaks[1]
    );
    assert!(
        peaks.iter().all(|p| *p < 1024),
        "peak memory {peaks:?} MiB is over 1 GiB"
    );
}
