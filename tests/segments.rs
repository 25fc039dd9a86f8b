//! Integration tests of segment-parallel transcoding: real transcoder processes, the real
//! broker, real FFmpeg. The media side (frame-exact seams, VFR, B-frames, audio once,
//! quality) is proven in the transcoder crate's own tests; these prove the distribution:
//! the split, many workers, the one stitch, crashes, races and dead segments.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use shared::events::JobState;
use shared::messages::{JobMessage, Stage, TranscodeJob};
use shared::storage_key::StorageKey;

use crate::support::fixtures::{self, ffprobe};
use crate::support::{TestEnv, eventually, stays};

const WORKER: &str = "transcoder";
const PATIENCE: Duration = Duration::from_secs(180);

/// Settings that split an 8-second clip into 2-second segments, each announced by a
/// `started` event however quickly it runs (a test kills a worker once it has one).
const SPLIT: [(&str, &str); 5] = [
    ("VIDPIPE__TRANSCODER__SEGMENT_THRESHOLD_SECS", "3"),
    ("VIDPIPE__TRANSCODER__SEGMENT_SECS", "2"),
    ("VIDPIPE__TRANSCODER__HLS_SEGMENT_S", "1"),
    ("VIDPIPE__TRANSCODER__KEYFRAME_INTERVAL_S", "1"),
    ("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0"),
];

fn one_rendition() -> Value {
    json!({
        "renditions": [{"name": "240p", "height": 240, "video_kbps": 600, "audio_kbps": 64}],
        "formats": ["mp4", "hls"]
    })
}

/// Video frames of the first video stream, counted by decoding.
fn frame_count(path: &Path) -> u64 {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("running ffprobe");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("frame count of {}: {e}", path.display()))
}

/// Waits until a manifest exists under every one of `prefixes`.
async fn all_committed(env: &TestEnv, prefixes: &[StorageKey], what: &str) {
    eventually(PATIENCE, what, async || {
        for p in prefixes {
            if !env.storage_committed(p).await {
                return false;
            }
        }
        true
    })
    .await;
}

/// The parts a transcoder would fan `job` out into, planned here with the same code and
/// settings the workers use (so a test can hold some back, or publish one twice).
fn parts_of(job: &TranscodeJob, source: &Path) -> Vec<TranscodeJob> {
    let settings = transcoder::TranscoderSettings {
        segment_threshold_secs: 3.0,
        segment_secs: 2.0,
        hls_segment_s: 1.0,
        keyframe_interval_s: 1.0,
        ..Default::default()
    };
    let ctx = shared::JobContext::standalone(
        source,
        &std::env::temp_dir(),
        tokio_util::sync::CancellationToken::new(),
    );
    transcoder::segmented::plan(job, source, &settings, &Default::default(), &ctx)
        .expect("planning")
        .expect("an 8-second clip is split")
}

/// A transcode job for a clip stored under the job's upload key.
async fn stored_job(env: &TestEnv, clip: &Path) -> TranscodeJob {
    let (id, _, prefix) = crate::support::job_keys("transcode");
    let source = env
        .put_source_file(&format!("uploads/{id}/source"), clip)
        .await;
    serde_json::from_value(json!({
        "job_id": id, "source": source.as_str(), "output_prefix": prefix.as_str(),
        "renditions": one_rendition()["renditions"], "formats": ["mp4", "hls"],
    }))
    .expect("a transcode job")
}

/// How many `completed` events of the transcode task were seen.
fn completions(events: &crate::support::EventStream) -> usize {
    events
        .seen
        .iter()
        .filter(|e| e.task == "transcode" && e.state == JobState::Completed)
        .count()
}

/// The split: two workers share the segments of one source, the stitched MP4 has every
/// frame of the source, `completed` comes once, and the parts are cleaned up.
#[tokio::test]
async fn a_long_source_is_split_over_two_workers_and_completes_once() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    env.spawn_worker(WORKER, "seg-a", &SPLIT);
    env.spawn_worker(WORKER, "seg-b", &SPLIT);
    let (id, _, _) = crate::support::job_keys("transcode");
    let mut events = env.follow_events(id).await;
    let source = env
        .put_source_file(&format!("uploads/{id}/source"), &clip)
        .await;
    let prefix = StorageKey::output_prefix(id, "transcode").unwrap();
    let mut job = json!({
        "schema": 1, "task": "transcode", "job_id": id,
        "source": source.as_str(), "output_prefix": prefix.as_str(),
    });
    job.as_object_mut()
        .unwrap()
        .extend(one_rendition().as_object().unwrap().clone());
    env.publish_raw("transcode", &serde_json::to_vec(&job).unwrap())
        .await;

    events
        .wait_for("transcode", JobState::Completed, PATIENCE)
        .await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    let split = events
        .seen
        .iter()
        .find_map(|e| e.detail.clone().filter(|d| d.starts_with("split into")));
    assert_eq!(
        split.as_deref(),
        Some("split into 5 parts"),
        "{:?}",
        events.seen
    );
    assert_eq!(
        manifest.summary["segments"]["count"], 4,
        "{:#?}",
        manifest.summary
    );
    let mp4 = env.output_path(&manifest, "240p.mp4");
    assert_eq!(
        frame_count(&mp4),
        frame_count(&clip),
        "every source frame, once"
    );
    for worker in ["seg-a", "seg-b"] {
        let log = std::fs::read_to_string(env.data.path().join(format!("{worker}.log"))).unwrap();
        assert!(
            log.contains("part completed"),
            "{worker} did no segment:\n{log}"
        );
    }
    let parts = StorageKey::new(format!("{prefix}parts/")).unwrap();
    eventually(Duration::from_secs(10), "the parts removed", async || {
        env.storage_list(&parts).await.is_empty()
    })
    .await;
    stays(Duration::from_secs(3), "one completed event", async || {
        events.poll(Duration::from_millis(50)).await;
        completions(&events) == 1
    })
    .await;
}

/// A worker killed in the middle of a segment loses nothing: its segment is redelivered
/// to the other worker and the job completes, once.
#[tokio::test]
async fn a_worker_killed_mid_segment_leaves_the_job_to_complete_once() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    let job = stored_job(&env, &clip).await;
    let mut events = env.follow_events(job.job_id).await;
    let doomed = env.spawn_worker(WORKER, "doomed", &SPLIT);
    // The worker takes the first part while the others wait in the queue.
    for part in parts_of(&job, &clip) {
        env.publish(&part).await;
    }
    let started = events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    assert!(started.part.is_some(), "{started:?}");
    env.worker(doomed).signal("KILL");
    env.spawn_worker(WORKER, "survivor", &SPLIT);
    let manifest = env.wait_manifest(&job.output_prefix, PATIENCE).await;
    assert_eq!(
        frame_count(&env.output_path(&manifest, "240p.mp4")),
        frame_count(&clip)
    );
    stays(Duration::from_secs(3), "one completed event", async || {
        events.poll(Duration::from_millis(50)).await;
        completions(&events) <= 1
    })
    .await;
    assert_eq!(completions(&events), 1, "{:?}", events.seen);
}

/// Two last segments finishing together (both may see every part committed and publish
/// a stitch), then one more stitch after the task is done (a redelivery): one result, one
/// `completed`, and nothing under the output prefix but that result.
#[tokio::test]
async fn stitches_racing_make_one_result() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    let job = stored_job(&env, &clip).await;
    let mut events = env.follow_events(job.job_id).await;
    for name in ["r1", "r2", "r3"] {
        env.spawn_worker(WORKER, name, &SPLIT);
    }
    let parts = parts_of(&job, &clip);
    // Hold back two segments of equal length; the rest are committed first.
    let (last_two, rest): (Vec<_>, Vec<_>) = parts
        .iter()
        .enumerate()
        .partition(|(i, _)| [1, 2].contains(i));
    for (_, part) in &rest {
        env.publish(*part).await;
    }
    let prefixes: Vec<StorageKey> = rest.iter().map(|(_, p)| p.commit_prefix()).collect();
    all_committed(&env, &prefixes, "the other parts committed").await;
    for (_, part) in &last_two {
        env.publish(*part).await;
    }
    let manifest = env.wait_manifest(&job.output_prefix, PATIENCE).await;
    let mut stitch = parts[0].clone();
    if let Some(p) = stitch.part.as_mut() {
        p.stage = Stage::Stitch;
    }
    env.publish(&stitch).await;
    eventually(
        PATIENCE,
        "the extra stitch handled as a duplicate",
        async || {
            let logs = env.logs();
            logs.contains("already committed by an earlier delivery")
                || logs.contains("committed first")
        },
    )
    .await;
    stays(Duration::from_secs(3), "one completed event", async || {
        events.poll(Duration::from_millis(50)).await;
        completions(&events) <= 1
    })
    .await;
    assert_eq!(completions(&events), 1, "{:?}", events.seen);
    assert_eq!(
        env.wait_manifest(&job.output_prefix, PATIENCE).await,
        manifest
    );
    eventually(
        Duration::from_secs(30),
        "only the result is left",
        async || {
            let mut stored = env.storage_list(&job.output_prefix).await;
            stored.sort();
            let mut expected: Vec<String> = manifest
                .outputs
                .iter()
                .map(|o| o.key.to_string())
                .chain([format!("{}manifest.json", job.output_prefix)])
                .collect();
            expected.sort();
            stored == expected
        },
    )
    .await;
    assert_eq!(
        frame_count(&env.output_path(&manifest, "240p.mp4")),
        frame_count(&clip)
    );
}

/// A segment that cannot be done makes the transcode dead with that segment's reason
/// (as `producer status` shows it); once the cause is fixed, `producer dead replay`
/// of the job runs that segment and the job completes.
#[tokio::test]
async fn a_dead_segment_makes_the_transcode_dead_and_replay_resumes_it() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    let job = stored_job(&env, &clip).await;
    env.spawn_worker(WORKER, "w", &SPLIT);
    let parts = parts_of(&job, &clip);
    let (held, rest) = parts.split_first().unwrap();
    for part in rest {
        env.publish(part).await;
    }
    let prefixes: Vec<StorageKey> = rest.iter().map(JobMessage::commit_prefix).collect();
    all_committed(&env, &prefixes, "the other parts committed").await;
    // Status reads the progress of a split task from the parts' manifests.
    let id = job.job_id.to_string();
    let status = env.producer(&["status", &id, "--json"]).await;
    let status: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(
        status["tasks"]["transcode"],
        json!({"state": "pending", "segments": {"done": 3, "of": 4}}),
        "{status:#}"
    );
    // The source goes missing: the held segment fails permanently.
    let source_path = env.storage_root().join(job.source.as_str());
    let saved = std::fs::read(&source_path).unwrap();
    std::fs::remove_file(&source_path).unwrap();
    env.publish(held).await;
    eventually(PATIENCE, "the transcode reported dead", async || {
        let out = env.producer(&["status", &id, "--json"]).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("dead") && text.contains("segment 1/4")
    })
    .await;
    std::fs::write(&source_path, saved).unwrap();
    let replay = env.producer(&["dead", "replay", &id]).await;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let manifest = env.wait_manifest(&job.output_prefix, PATIENCE).await;
    let probe = ffprobe(&env.output_path(&manifest, "hls/240p/index.m3u8"));
    assert_eq!(probe["streams"][0]["codec_name"], "h264", "{probe:#}");
}

/// `producer upload --wait` on a source the transcoders split: one transcode task,
/// followed through its segments (`segments done 4/4` in the report) to one `completed`;
/// with `--segments off` the same upload is not split.
#[tokio::test]
async fn upload_wait_follows_a_split_transcode_as_one_task() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    env.spawn_worker(WORKER, "w1", &SPLIT);
    env.spawn_worker(WORKER, "w2", &SPLIT);
    env.spawn_worker("thumbnailer", "thumbs", &[]);
    let upload = |mode: &'static str| {
        let clip = clip.to_str().unwrap().to_owned();
        let env = &env;
        async move {
            let args = [
                "upload",
                &clip,
                "--wait",
                "--timeout",
                "240",
                "--json",
                "--segments",
                mode,
            ];
            let out = env.producer(&args).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                env.logs()
            );
            let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
            report["tasks"]["transcode"].clone()
        }
    };
    let split = upload("auto").await;
    assert_eq!(split["state"], "completed", "{split}");
    assert_eq!(split["segments"], json!({"done": 4, "of": 4}), "{split}");
    let whole = upload("off").await;
    assert_eq!(whole["state"], "completed", "{whole}");
    assert!(whole["segments"].is_null(), "{whole}");
}

/// `ladder: auto` on a split source: the planner fits the ladder once, every part
/// carries the same fitted CRF and cap (so no seam between parts encoded by different
/// workers shows a change of quality), and the stitched task's manifest records the fit.
#[tokio::test]
async fn an_auto_ladder_is_fitted_once_and_every_part_encodes_it() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    let mut job = stored_job(&env, &clip).await;
    job.ladder = shared::messages::LadderMode::Auto;
    let parts = parts_of(&job, &clip);
    let ladders: Vec<_> = parts
        .iter()
        .map(|p| p.part.as_ref().unwrap().ladder.clone())
        .collect();
    assert!(ladders.len() >= 3, "an 8-second clip is split");
    assert!(
        ladders.iter().all(|l| *l == ladders[0]),
        "parts disagree: {ladders:?}"
    );
    let crf = ladders[0][0]
        .crf
        .expect("the fitted CRF travels with the part");
    env.spawn_worker(WORKER, "fit-a", &SPLIT);
    for part in &parts {
        env.publish(part).await;
    }
    let manifest = env.wait_manifest(&job.output_prefix, PATIENCE).await;
    let fit = &manifest.summary["ladder_fit"];
    assert_eq!(
        fit["rungs"][0]["crf"].as_u64(),
        Some(u64::from(crf)),
        "{fit}"
    );
    assert_eq!(
        manifest.summary["renditions"][0]["crf"].as_u64(),
        Some(u64::from(crf)),
        "{}",
        manifest.summary
    );
    assert_eq!(
        frame_count(&env.output_path(&manifest, "240p.mp4")),
        frame_count(&clip)
    );
}
