//! Integration tests: `producer watch DIR` as a real process against the real broker and
//! storage: a file copied in slowly is uploaded once, whole; a restart uploads nothing
//! twice and finishes an interrupted upload under its recorded job id; refused and dead
//! files end in `failed/` with their reason.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::support::{TestEnv, eventually, fixtures, stays};

const PATIENCE: Duration = Duration::from_secs(60);

/// Starts `producer watch DIR` (settle 1 s, a look every 0.2 s) with `extra` arguments.
fn start_watch(env: &mut TestEnv, name: &str, dir: &Path, extra: &[&str]) -> usize {
    let dir = dir.display().to_string();
    let mut args = vec!["watch", dir.as_str(), "--settle", "1", "--poll", "0.2"];
    args.extend_from_slice(extra);
    env.spawn_process("producer", name, &args, &[])
}

/// The `JOB_ID<TAB>NAME` lines a watcher printed.
fn uploads(env: &mut TestEnv, watcher: usize) -> Vec<(Uuid, String)> {
    env.worker(watcher)
        .log_text()
        .lines()
        .filter_map(|l| {
            let (id, name) = l.split_once('\t')?;
            Some((id.parse().ok()?, name.to_owned()))
        })
        .collect()
}

/// Every job's source folder in storage (`uploads/<job_id>/`).
async fn stored_jobs(env: &TestEnv) -> Vec<String> {
    let keys = env
        .storage_list(&StorageKey::new("uploads/").unwrap())
        .await;
    let mut jobs: Vec<String> = keys
        .iter()
        .filter_map(|k| k.split('/').nth(1).map(str::to_owned))
        .collect();
    jobs.dedup();
    jobs
}

/// Messages waiting in both queues of both kinds (no workers run).
async fn queued(env: &TestEnv) -> u32 {
    let mut n = 0;
    for q in env.topology.work_queues() {
        n += env.queue_depth(&q).await;
    }
    n
}

/// A folder to watch, inside the environment's temporary directory.
fn watched(env: &TestEnv) -> PathBuf {
    let dir = env.data.path().join("watch");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fixture clip made beside the folder and renamed into it (complete at once).
fn drop_in(env: &TestEnv, dir: &Path, name: &str) -> PathBuf {
    let made = fixtures::sample_mp4(env.data.path(), name, 1, 160, 90);
    std::fs::rename(&made, dir.join(name)).unwrap();
    dir.join(name)
}

/// A file written in five chunks 0.4 s apart (settle is 1 s) is uploaded once, whole,
/// and moved to done/: one job, one message per task.
#[tokio::test]
async fn watch_picks_up_a_file_copied_in_slowly_exactly_once() {
    let mut env = TestEnv::new().await;
    let dir = watched(&env);
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", 2, 160, 90);
    let bytes = std::fs::read(&clip).unwrap();
    let w = start_watch(&mut env, "watch-slow", &dir, &[]);
    let mut file = std::fs::File::create(dir.join("slow.mp4")).unwrap();
    let mut pace = tokio::time::interval(Duration::from_millis(400));
    for chunk in bytes.chunks(bytes.len().div_ceil(5)) {
        pace.tick().await;
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
    }
    drop(file);
    eventually(PATIENCE, "slow.mp4 to move to done/", async || {
        dir.join("done/slow.mp4").exists()
    })
    .await;
    stays(Duration::from_secs(3), "exactly one upload", async || {
        uploads(&mut env, w).len() == 1 && queued(&env).await == 2
    })
    .await;
    let (job, name) = uploads(&mut env, w).remove(0);
    assert_eq!(name, "slow.mp4");
    let source = StorageKey::new(format!("uploads/{job}/source.mp4")).unwrap();
    let stored = env.storage.get_bytes(&source).await.unwrap().unwrap();
    assert!(
        stored == bytes,
        "the whole file was stored, not a part of it"
    );
}

/// A restarted watcher uploads nothing it uploaded before, and an upload a crash
/// interrupted (recorded in the state file) is published under its recorded job id.
#[tokio::test]
async fn a_restarted_watch_does_not_upload_again() {
    let mut env = TestEnv::new().await;
    let dir = watched(&env);
    drop_in(&env, &dir, "first.mp4");
    let w = start_watch(&mut env, "watch-1", &dir, &[]);
    eventually(PATIENCE, "first.mp4 to be uploaded", async || {
        uploads(&mut env, w).len() == 1
    })
    .await;
    env.worker(w).signal("TERM");
    assert!(
        env.worker(w)
            .wait_exit(PATIENCE)
            .is_some_and(|s| s.success())
    );

    // As if a watcher had crashed while storing `second.mp4`.
    let second = drop_in(&env, &dir, "second.mp4");
    let meta = std::fs::metadata(&second).unwrap();
    let interrupted = Uuid::new_v4();
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    let state = serde_json::json!({ "uploading": { "second.mp4": {
        "job_id": interrupted, "size": meta.len(), "mtime_ns": mtime_ns } } });
    std::fs::write(dir.join(".vidpipe-watch.json"), state.to_string()).unwrap();

    let w2 = start_watch(&mut env, "watch-2", &dir, &[]);
    eventually(PATIENCE, "second.mp4 to be uploaded", async || {
        uploads(&mut env, w2).len() == 1
    })
    .await;
    assert_eq!(uploads(&mut env, w2)[0], (interrupted, "second.mp4".into()));
    stays(Duration::from_secs(3), "no second upload", async || {
        uploads(&mut env, w2).len() == 1 && stored_jobs(&env).await.len() == 2
    })
    .await;
    let state = std::fs::read_to_string(dir.join(".vidpipe-watch.json")).unwrap();
    assert!(
        !state.contains("second.mp4"),
        "the finished upload left the state: {state}"
    );
}

/// A file that is not a video by its name goes to failed/ at once; one that is not a
/// video inside goes, with --wait and real workers, once its tasks are dead. Each gets
/// its reason beside it.
#[tokio::test]
async fn refused_and_dead_files_are_moved_to_failed() {
    let mut env = TestEnv::new().await;
    let dir = watched(&env);
    env.spawn_worker("transcoder", "watch-transcoder", &[]);
    env.spawn_worker("thumbnailer", "watch-thumbnailer", &[]);
    start_watch(&mut env, "watch-fail", &dir, &["--wait"]);
    std::fs::write(dir.join("notes.txt"), b"not a video").unwrap();
    std::fs::write(dir.join("fake.mp4"), vec![0x5a; 4096]).unwrap();
    eventually(PATIENCE, "notes.txt in failed/", async || {
        dir.join("failed/notes.txt.reason.txt").exists()
    })
    .await;
    let reason = std::fs::read_to_string(dir.join("failed/notes.txt.reason.txt")).unwrap();
    assert!(reason.contains("not a video file"), "{reason}");
    eventually(
        PATIENCE,
        "fake.mp4 to move from done/ to failed/",
        async || dir.join("failed/fake.mp4.reason.txt").exists(),
    )
    .await;
    assert!(dir.join("failed/fake.mp4").exists() && !dir.join("done/fake.mp4").exists());
    let reason = std::fs::read_to_string(dir.join("failed/fake.mp4.reason.txt")).unwrap();
    assert!(reason.contains("dead"), "{reason}");
}
