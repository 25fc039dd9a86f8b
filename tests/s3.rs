//! Integration tests: S3-compatible storage against a real S3 server (moto), through
//! real worker processes where a worker is involved.

use std::time::Duration;

use futures::future::join_all;
use serde_json::json;
use shared::events::JobState;
use shared::handler::TaskOutput;
use shared::manifest::Completion;
use shared::storage::{OWNER_METADATA, Storage};
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::support::s3::S3Server;
use crate::support::{TestEnv, eventually, job_keys, test_job};

const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(60);

fn bucket() -> String {
    format!("vidpipe-{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// An environment whose storage (and workers' storage) is a fresh bucket on `s3`.
async fn s3_env(s3: &S3Server) -> TestEnv {
    let mut env = TestEnv::new().await;
    let bucket = bucket();
    let status = std::process::Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            &format!("http://127.0.0.1:{}/{bucket}", s3.port),
        ])
        .status()
        .expect("curl");
    assert!(status.success(), "creating bucket {bucket}");
    env.use_storage(&s3.settings(&bucket), s3.env(&bucket));
    env
}

/// Upload → worker → outputs and manifest, all on S3; scratch is empty afterwards.
#[tokio::test]
async fn job_round_trips_through_s3() {
    let s3 = S3Server::start("warmup").await;
    let mut env = s3_env(&s3).await;
    env.spawn_worker(WORKER, "s3-worker", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"hello from s3").await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    let key = manifest.outputs[0].key.clone();
    assert_eq!(
        env.storage.get_bytes(&key).await.unwrap().unwrap(),
        b"hello from s3"
    );
    eventually(PATIENCE, "scratch to be cleaned", async || {
        env.scratch_leftovers().is_empty()
    })
    .await;
}

/// A source larger than the in-memory upload buffer streams through multipart upload
/// and comes back byte for byte.
#[tokio::test]
async fn source_larger_than_the_upload_buffer_streams() {
    let s3 = S3Server::start("warmup").await;
    let env = s3_env(&s3).await;
    let file = env.data.path().join("big.bin");
    let bytes: Vec<u8> = (0..(12u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    let key = StorageKey::new("uploads/big/source.bin").unwrap();
    let sent = env.storage.put_file(&key, &file, &|_| {}).await.unwrap();
    assert_eq!(sent, bytes.len() as u64);
    let scratch = tempfile::tempdir().unwrap();
    let local = env.storage.fetch(&key, scratch.path()).await.unwrap();
    assert_eq!(local.size, bytes.len() as u64);
    assert!(
        std::fs::read(&local.path).unwrap() == bytes,
        "downloaded copy differs"
    );
}

/// Many workers committing the same task at once leave exactly one complete result:
/// one manifest, naming one run's files, all present; the losers' files are gone.
#[tokio::test]
async fn racing_commits_leave_exactly_one_complete_result() {
    let s3 = S3Server::start("warmup").await;
    let env = s3_env(&s3).await;
    let prefix = StorageKey::output_prefix(Uuid::new_v4(), "transcode").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let racers = (0..8).map(|i| {
        let file = dir.path().join(format!("out-{i}.txt"));
        std::fs::write(&file, format!("racer {i}")).unwrap();
        let mut output = TaskOutput::default();
        output.push("out.txt", file, json!({ "racer": i }));
        let storage: Storage = env.storage.clone();
        let prefix = prefix.clone();
        let completion = Completion {
            schema: 1,
            job_id: Uuid::nil(),
            task: "transcode".into(),
            source: StorageKey::new("uploads/racer/source.mp4").unwrap(),
            worker: format!("racer-{i}"),
            attempt: 1,
            completed_at: "2026-11-30T14:00:00Z".into(),
            duration_s: 0.0,
        };
        async move { storage.commit(&prefix, &output, completion).await.unwrap() }
    });
    let results = join_all(racers).await;
    let winners: Vec<_> = results.iter().flatten().collect();
    assert_eq!(winners.len(), 1, "exactly one commit wins");
    let manifest = env.storage.manifest(&prefix).await.unwrap().unwrap();
    assert_eq!(&manifest, winners[0]);
    let content = env
        .storage
        .get_bytes(&manifest.outputs[0].key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(content).unwrap(),
        format!("racer {}", manifest.outputs[0].facts["racer"])
    );
    let listed = env.storage.list(&prefix).await.unwrap();
    assert_eq!(
        listed.len(),
        2,
        "only the winner's file and the manifest remain: {listed:?}"
    );
}

/// The owner check of a redelivered job is one `HEAD` on S3: a committed manifest
/// carries its job id as object metadata, and the body is not read (below it is not even
/// JSON). A manifest without that metadata (written before it existed) is read instead.
#[tokio::test]
async fn manifest_owner_is_answered_by_its_metadata() {
    let s3 = S3Server::start("warmup").await;
    let bucket = bucket();
    s3.create_bucket(&bucket);
    let storage = Storage::from_settings(&s3.settings(&bucket)).unwrap();

    let (owner, prefix) = (Uuid::new_v4(), job_keys("transcode").2);
    let manifest = Storage::manifest_key(&prefix);
    s3.put_raw(
        &bucket,
        manifest.as_str(),
        "not a manifest at all",
        &[&format!("x-amz-meta-{OWNER_METADATA}: {owner}")],
    );
    assert_eq!(storage.manifest_owner(&prefix).await.unwrap(), Some(owner));

    let (old, old_prefix) = (Uuid::new_v4(), job_keys("transcode").2);
    let old_style = json!({
        "schema": 1, "job_id": old, "task": "transcode",
        "source": format!("uploads/{old}/source.mp4"), "worker": "w", "attempt": 1,
        "completed_at": "2026-11-30T14:00:00Z", "duration_s": 1.0,
        "run": "run-0123456789ab", "outputs": [], "summary": null,
    });
    storage
        .put_bytes(
            &Storage::manifest_key(&old_prefix),
            old_style.to_string().into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        storage.manifest_owner(&old_prefix).await.unwrap(),
        Some(old)
    );
    let none = job_keys("transcode").2;
    assert_eq!(storage.manifest_owner(&none).await.unwrap(), None);

    // What commit writes carries the metadata.
    let (id, source, committed) = job_keys("transcode");
    let completion = Completion {
        schema: 1,
        job_id: id,
        task: "transcode".into(),
        source: StorageKey::new(source).unwrap(),
        worker: "w".into(),
        attempt: 1,
        completed_at: "2026-11-30T14:00:00Z".into(),
        duration_s: 0.0,
    };
    storage
        .commit(&committed, &TaskOutput::default(), completion)
        .await
        .unwrap()
        .expect("committed");
    let headers = s3.head_raw(&bucket, Storage::manifest_key(&committed).as_str());
    assert!(
        headers.contains(&format!("x-amz-meta-{OWNER_METADATA}: {id}")),
        "{headers}"
    );
}

/// A missing source object is a permanent failure naming it.
#[tokio::test]
async fn missing_s3_object_is_dead_with_reason() {
    let s3 = S3Server::start("warmup").await;
    let mut env = s3_env(&s3).await;
    env.spawn_worker(WORKER, "s3-missing", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].attempts(), Some(1));
    assert!(
        dead[0].reason().contains("does not exist"),
        "{}",
        dead[0].reason()
    );
}

/// A worker pointed at a bucket that does not exist parks the job with that reason.
#[tokio::test]
async fn wrong_bucket_is_dead_with_reason() {
    let s3 = S3Server::start("warmup").await;
    let mut env = s3_env(&s3).await;
    let extra: Vec<(&str, &str)> = vec![("VIDPIPE__STORAGE__S3__BUCKET", "no-such-bucket-here")];
    env.spawn_worker(WORKER, "s3-wrong-bucket", &extra);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].attempts(), Some(1), "{}", dead[0].reason());
    // S3 answers a HEAD in a missing bucket with a bare 404, so the reason cannot always
    // say "bucket"; what matters is that it is permanent at once and names the object.
    assert!(
        dead[0].reason().contains("does not exist"),
        "{}",
        dead[0].reason()
    );
}

/// The store goes away mid-job: the failure is transient, the job is retried, and it
/// completes once the store is back; scratch is empty afterwards.
#[tokio::test]
async fn s3_outage_mid_job_is_retried_until_it_completes() {
    let s3 = S3Server::start("warmup").await;
    let mut env = s3_env(&s3).await;
    env.spawn_worker(
        WORKER,
        "s3-outage",
        &[("VIDPIPE__RETRY__MAX_ATTEMPTS", "20")],
    );
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 1000 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    s3.down();
    let retrying = events
        .wait_for("transcode", JobState::Retrying, PATIENCE)
        .await;
    assert!(
        retrying.detail.as_deref().unwrap_or("").contains("storage"),
        "{retrying:?}"
    );
    s3.up().await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    assert!(manifest.completion.attempt >= 2);
    eventually(PATIENCE, "scratch to be cleaned", async || {
        env.scratch_leftovers().is_empty()
    })
    .await;
}

/// The whole pipeline on S3: `producer upload --wait` streams a real video into the
/// bucket, the real transcoder and thumbnailer read it from there and write their
/// renditions, images and manifests back; scratch space is empty afterwards.
#[tokio::test]
async fn media_round_trips_through_s3_with_the_real_workers() {
    let s3 = S3Server::start("warmup").await;
    let mut env = s3_env(&s3).await;
    let clip = crate::support::fixtures::sample_mp4(env.data.path(), "clip.mp4", 2, 320, 240);
    env.spawn_worker("transcoder", "s3-transcoder", &[]);
    env.spawn_worker("thumbnailer", "s3-thumbnailer", &[]);
    let out = env
        .producer(&[
            "upload",
            clip.to_str().unwrap(),
            "--wait",
            "--timeout",
            "240",
            "--json",
        ])
        .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job_id = report["job_id"].as_str().unwrap();
    for (task, must_have) in [
        ("transcode", "hls/master.m3u8"),
        ("thumbnail", "poster.jpg"),
    ] {
        let prefix = StorageKey::output_prefix(job_id.parse().unwrap(), task).unwrap();
        let manifest = env
            .storage
            .manifest(&prefix)
            .await
            .unwrap()
            .expect("manifest");
        assert!(
            manifest.outputs.iter().any(|o| o.name == must_have),
            "{manifest:#?}"
        );
        for o in &manifest.outputs {
            let key = o.key.clone();
            let bytes = env
                .storage
                .get_bytes(&key)
                .await
                .unwrap()
                .expect("listed output exists");
            assert_eq!(bytes.len() as u64, o.size_bytes, "{key}");
        }
    }
    eventually(PATIENCE, "scratch to be cleaned", async || {
        env.scratch_leftovers().is_empty()
    })
    .await;
}
