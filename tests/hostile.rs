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
                for o in &m.outputs {
                    let path = env.storage_root().join(o.key.as_str());
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

/// The outcome of one hostile upload: its reason when dead, with nothing under its
/// output prefix in storage.
async fn dead_with_no_output(
    env: &TestEnv,
    submitted: &[(
        &'static str,
        &'static str,
        uuid::Uuid,
        shared::storage_key::StorageKey,
    )],
) -> Vec<(&'static str, &'static str, String)> {
    let dead = env.wait_dead(submitted.len(), PATIENCE).await;
    let mut reasons = Vec::new();
    for (name, task, id, prefix) in submitted {
        let letter = dead
            .iter()
            .find(|d| {
                serde_json::from_slice::<serde_json::Value>(&d.body).unwrap()["job_id"]
                    == id.to_string()
            })
            .unwrap_or_else(|| panic!("{name}/{task}: not dead\n{}", env.logs()));
        assert!(
            env.storage.manifest(prefix).await.unwrap().is_none(),
            "{name}/{task}: a manifest was written"
        );
        let outputs = env.storage_root().join(prefix.as_str());
        let files = walk(&outputs);
        assert!(
            files.is_empty(),
            "{name}/{task}: outputs written: {files:?}"
        );
        reasons.push((*name, *task, letter.reason()));
    }
    reasons
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

/// Uploads that are lists of other files (an HLS playlist, a DASH manifest, a concat list)
/// naming a file outside the storage root or another job's upload, and containers outside
/// the allow-list (a still image, an MP3): each ends dead at once with a reason that names
/// what it is, no output at all, and no other file ever read.
#[tokio::test]
async fn uploads_naming_other_files_are_dead_with_their_reason_and_no_output() {
    let mut env = TestEnv::new().await;
    let dir = env.data.path().join("hostile");
    std::fs::create_dir_all(&dir).unwrap();
    // Another customer's upload in storage, and a video outside the root.
    let victim = fixtures::sample_mp4(&dir, "victim.mp4", 1, 160, 120);
    let (victim_id, _, _) = crate::support::job_keys("transcode");
    env.put_source_file(&format!("uploads/{victim_id}/source"), &victim)
        .await;
    let outside = fixtures::ffmpeg(
        &dir,
        "outside.ts",
        &["-i", victim.to_str().unwrap(), "-c", "copy"],
    );
    let outside = outside.display().to_string();
    let victim_abs = env
        .storage_root()
        .join(format!("uploads/{victim_id}/source"))
        .display()
        .to_string();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let hls = |uri: &str| {
        format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{uri}\n#EXT-X-ENDLIST\n"
        )
    };
    let png = fixtures::ffmpeg(
        &dir,
        "still.png",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x120",
            "-frames:v",
            "1",
        ],
    );
    let mp3 = fixtures::ffmpeg(
        &dir,
        "tone.mp3",
        &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "libmp3lame"],
    );
    let cases: Vec<(&'static str, PathBuf, &'static str)> = vec![
        (
            "HLS playlist, file outside the root",
            write("hls-outside.mp4", hls(&format!("file://{outside}"))),
            "HLS playlist",
        ),
        (
            "HLS playlist, another job's upload",
            write("hls-victim.mp4", hls(&format!("../{victim_id}/source"))),
            "HLS playlist",
        ),
        (
            "DASH manifest, file:// BaseURL",
            write(
                "dash.mp4",
                format!(
                    "<?xml version=\"1.0\"?>\n<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\" \
                     type=\"static\" mediaPresentationDuration=\"PT1S\"><BaseURL>file://{outside}</BaseURL>\
                     <Period><AdaptationSet><Representation id=\"1\" bandwidth=\"1\"/>\
                     </AdaptationSet></Period></MPD>\n"
                ),
            ),
            "DASH manifest",
        ),
        (
            "concat list, another job's upload",
            write(
                "concat.mp4",
                format!("ffconcat version 1.0\nfile '{victim_abs}'\n"),
            ),
            "concat list",
        ),
        ("PNG image named .mp4", png, "still image"),
        ("MP3 named .mp4", mp3, "audio file"),
    ];
    env.spawn_worker("transcoder", "hostile-lists-transcoder", &[]);
    env.spawn_worker("thumbnailer", "hostile-lists-thumbnailer", &[]);
    let mut submitted = Vec::new();
    for (name, path, _) in &cases {
        for task in ["transcode", "thumbnail"] {
            let (id, prefix) = env.submit_file(task, path, json!({})).await;
            submitted.push((*name, task, id, prefix));
        }
    }
    let reasons = dead_with_no_output(&env, &submitted).await;
    for (name, task, reason) in &reasons {
        println!("hostile: {name:<38} {task:<10} dead: {reason}");
        let want = cases.iter().find(|c| c.0 == *name).unwrap().2;
        assert!(
            reason.contains(want) && reason.contains("source is"),
            "{name}/{task}: `{reason}`"
        );
    }
    assert_eq!(
        reasons.len(),
        2 * cases.len(),
        "every case refused by both workers"
    );
}

/// The producer refuses a playlist up front with the workers' reason, storing nothing.
#[tokio::test]
async fn producer_refuses_a_playlist_before_storing_it() {
    let env = TestEnv::new().await;
    let file = env.data.path().join("clip.mp4");
    std::fs::write(&file, "#EXTM3U\n#EXTINF:2,\n../other/source.mp4\n").unwrap();
    let out = env.producer(&["upload", file.to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("HLS playlist") && stderr.contains("upload the video file itself"),
        "{stderr}"
    );
    assert!(walk(&env.storage_root()).is_empty(), "something was stored");
}

/// Limits hold on what is decoded, not on what a header says: extreme pixel aspect ratios,
/// a picture that changes size mid-stream (within the limits, and past them), and a raw
/// stream with no declared duration that runs past the duration limit. Each is dead with
/// its reason and no output.
#[tokio::test]
async fn decoded_pictures_and_times_are_held_to_the_limits() {
    let mut env = TestEnv::new().await;
    let dir = env.data.path().join("decoded");
    std::fs::create_dir_all(&dir).unwrap();
    let x264 = |name: &str, size: &str, seconds: u32, extra: &[&str]| {
        fixtures::x264_clip(&dir, name, size, seconds, extra)
    };
    let tall = x264("par-1-100.mp4", "160x120", 1, &["-vf", "setsar=1/100"]);
    let wide = x264("par-100-1.mp4", "160x120", 1, &["-vf", "setsar=100/1"]);
    // MPEG-TS carries each part's parameter sets in-band: `cat` gives one stream whose
    // picture size changes where the second part starts.
    let small = x264("small.ts", "160x120", 1, &[]);
    let later = ["-output_ts_offset", "1"];
    let medium = x264("medium.ts", "320x240", 1, &later);
    let large = x264("large.ts", "1280x720", 1, &later);
    let cat = |name: &str, parts: &[&PathBuf]| {
        let bytes: Vec<u8> = parts
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let grows = cat("grows.ts", &[&small, &medium]);
    let explodes = cat("explodes.ts", &[&small, &large]);
    let raw = x264("long.h264", "160x120", 5, &["-f", "h264"]);
    let sliver = x264("sliver.mp4", "16x480", 1, &[]);
    let both: &[&'static str] = &["transcode", "thumbnail"];
    // The thumbnailer of a raw stream with no duration only looks at its start: the
    // duration limit is the transcoder's to find (it decodes everything). A 16-pixel-wide
    // sliver transcodes at its own size, but its 320-wide thumbnails would be 9600 tall.
    let cases: Vec<(&'static str, PathBuf, &[&'static str], &'static str)> = vec![
        (
            "pixel aspect 1:100",
            tall,
            both,
            "pixel aspect ratio of 1:100",
        ),
        (
            "pixel aspect 100:1",
            wide,
            both,
            "pixel aspect ratio of 100:1",
        ),
        ("size change within limits", grows, both, "picture size"),
        (
            "size change past the limit",
            explodes,
            both,
            "640x480 limit",
        ),
        (
            "raw H.264, no duration, too long",
            raw,
            &["transcode"],
            "past the 3 s limit",
        ),
        (
            "16x480 sliver, thumbnails",
            sliver,
            &["thumbnail"],
            "thumbnail of this video is 320x9600, limit is 640x480",
        ),
    ];
    let limits = [
        ("VIDPIPE__MEDIA__MAX_WIDTH", "640"),
        ("VIDPIPE__MEDIA__MAX_HEIGHT", "480"),
        ("VIDPIPE__MEDIA__MAX_DURATION_S", "3"),
    ];
    env.spawn_worker("transcoder", "decoded-transcoder", &limits);
    env.spawn_worker("thumbnailer", "decoded-thumbnailer", &limits);
    let mut submitted = Vec::new();
    for (name, path, tasks, _) in &cases {
        for task in *tasks {
            let (id, prefix) = env.submit_file(task, path, json!({})).await;
            submitted.push((*name, *task, id, prefix));
        }
    }
    let reasons = dead_with_no_output(&env, &submitted).await;
    for (name, task, reason) in &reasons {
        println!("hostile: {name:<34} {task:<10} dead: {reason}");
        let want = cases.iter().find(|c| c.0 == *name).unwrap().3;
        assert!(reason.contains(want), "{name}/{task}: `{reason}`");
    }
}
