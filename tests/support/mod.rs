//! The test harness: a private, fully real environment per test.
//!
//! [`TestEnv::new`] picks a unique topology prefix and a fresh storage root, declares the
//! topology on the real broker, and gives helpers to publish jobs, spawn real worker
//! processes, follow events and read the dead letters. Dropping it kills its workers and
//! deletes everything it declared (including the work queue of the tests' own task kind,
//! [`kind::COPY`]). Waiting is always polling with a deadline.

#![allow(dead_code)] // each test module uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use shared::broker;
use shared::events::{JobEvent, JobState};
use shared::manifest::Manifest;
use shared::messages::{self, JobMessage};
use shared::settings::StorageSettings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::topology::Topology;
use uuid::Uuid;

pub mod cluster;
pub mod fixtures;
pub mod kind;
pub mod node;
pub mod s3;

/// Retry tiers used by tests: short, so retries happen within a test's patience.
pub const TEST_RETRY_DELAYS: [f64; 2] = [0.3, 0.6];

/// The broker tests use: `AMQP_URL`, or the local one.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `rabbitmqctl ARGS…` against the broker at [`amqp_url`]: the machine's `rabbitmqctl`, or
/// the command line in `VIDPIPE_TEST_RABBITMQCTL` when the tests run on another broker
/// (the test command's RabbitMQ 4.x pass sets it to `tests/rabbitmq4/node.sh ctl`).
pub fn broker_ctl(args: &[&str]) -> std::process::Output {
    let ctl = std::env::var("VIDPIPE_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = ctl.split_whitespace();
    let program = words
        .next()
        .expect("VIDPIPE_TEST_RABBITMQCTL names a command");
    Command::new(program)
        .args(words)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {ctl}: {e}"))
}

/// Directory holding the workspace's binaries (next to the test worker).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vidpipe-testworker"))
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

/// Path of a workspace binary, which must have been built (`cargo build --bins`).
pub fn bin(name: &str) -> PathBuf {
    let path = if name == "vidpipe-testworker" {
        PathBuf::from(env!("CARGO_BIN_EXE_vidpipe-testworker"))
    } else {
        bin_dir().join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// One test's private world.
pub struct TestEnv {
    pub prefix: String,
    pub topology: Topology,
    pub data: tempfile::TempDir,
    pub storage: Storage,
    pub conn: Connection,
    /// Confirm-mode channel for publishing.
    pub channel: Channel,
    /// The work queues' delivery limit (workers must declare the same).
    pub delivery_limit: u32,
    /// The broker this environment (and its workers) uses.
    pub amqp_url: String,
    /// Settings every worker of this environment gets besides the defaults above.
    extra_env: Vec<(String, String)>,
    /// `amqp.urls` for the processes this environment starts, in place of `amqp.url`.
    broker_list: Option<String>,
    workers: Vec<WorkerProcess>,
}

/// A worker process this test started.
pub struct WorkerProcess {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Sends a signal (`libc`-free: uses `kill`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }
    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("polling a child") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("polling a child").is_none()
    }
    /// The worker's log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl TestEnv {
    /// A fresh environment with the test retry delays.
    pub async fn new() -> Self {
        Self::with_delivery_limit(20).await
    }

    pub async fn with_delivery_limit(delivery_limit: u32) -> Self {
        Self::build(amqp_url(), delivery_limit).await
    }

    /// A fresh environment on another broker (a private node).
    pub async fn on_broker(url: &str) -> Self {
        Self::build(url.to_owned(), 20).await
    }

    /// Opens a new connection and channel (after the broker restarted under them).
    pub async fn reconnect(&mut self) {
        self.conn = broker::try_connect(&self.amqp_url, "vidpipe-tests")
            .await
            .expect("reconnecting to the broker");
        self.channel = broker::confirm_channel(&self.conn).await.expect("channel");
    }

    async fn build(amqp_url: String, delivery_limit: u32) -> Self {
        let prefix = format!("test-{}.", &Uuid::new_v4().simple().to_string()[..12]);
        let topology = Topology::new(
            &prefix,
            TEST_RETRY_DELAYS
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect(),
            delivery_limit,
        )
        // The tests' own kind as well, as its worker declares it: so tests can publish
        // to it before the worker is up, and dropping the env deletes its queue.
        .with_kind(kind::COPY);
        let data = tempfile::tempdir().expect("temp dir");
        let storage = Storage::from_settings(&StorageSettings {
            root: data.path().join("store"),
            ..Default::default()
        })
        .expect("storage");
        let conn = broker::try_connect(&amqp_url, "vidpipe-tests")
            .await
            .expect("the tests need RabbitMQ at AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f)");
        let channel = broker::confirm_channel(&conn).await.expect("channel");
        topology
            .declare(&channel)
            .await
            .expect("declaring the test topology");
        Self {
            prefix,
            topology,
            data,
            storage,
            conn,
            channel,
            delivery_limit,
            amqp_url,
            extra_env: Vec::new(),
            broker_list: None,
            workers: Vec::new(),
        }
    }

    /// Switches this environment (and the workers it starts) to other storage.
    pub fn use_storage(&mut self, settings: &StorageSettings, env: Vec<(String, String)>) {
        self.storage = Storage::from_settings(settings).expect("storage");
        self.extra_env = env;
    }

    /// Gives every process this environment starts from now on (workers and the
    /// producer) setting `key` = `value`.
    pub fn add_env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.to_owned(), value.to_owned()));
    }

    /// Points the processes this environment starts at several brokers (`amqp.urls`,
    /// comma separated) instead of its own one (`amqp.url`).
    pub fn use_broker_list(&mut self, urls: &str) {
        self.broker_list = Some(urls.to_owned());
    }

    /// The environment variables that point a process at this test's world.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let delays = TEST_RETRY_DELAYS.map(|d| d.to_string()).join(",");
        let broker = match &self.broker_list {
            Some(list) => ("VIDPIPE__AMQP__URLS".into(), list.clone()),
            None => ("VIDPIPE__AMQP__URL".into(), self.amqp_url.clone()),
        };
        let mut vars = vec![
            broker,
            ("VIDPIPE__AMQP__MAX_BACKOFF_SECS".into(), "1".into()),
            ("VIDPIPE__TOPOLOGY__PREFIX".into(), self.prefix.clone()),
            ("VIDPIPE__RETRY__DELAYS_SECS".into(), delays),
            (
                "VIDPIPE__RETRY__DELIVERY_LIMIT".into(),
                self.delivery_limit.to_string(),
            ),
            (
                "VIDPIPE__STORAGE__ROOT".into(),
                self.storage_root().display().to_string(),
            ),
            (
                "VIDPIPE__WORKER__SCRATCH_DIR".into(),
                self.scratch_dir().display().to_string(),
            ),
            ("VIDPIPE__LOG__LEVEL".into(), "info,lapin=warn".into()),
        ];
        vars.extend(self.extra_env.iter().cloned());
        vars
    }

    /// `job-*` scratch directories left behind (should be none once jobs settle).
    pub fn scratch_leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.scratch_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("job-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn storage_root(&self) -> PathBuf {
        self.data.path().join("store")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.data.path().join("scratch")
    }

    /// Starts a worker binary with this environment plus `extra` settings.
    pub fn spawn_worker(&mut self, binary: &str, name: &str, extra: &[(&str, &str)]) -> usize {
        self.spawn_process(binary, name, &[], extra)
    }

    /// Starts any binary (with `args`) as [`Self::spawn_worker`] does: this environment's
    /// settings, output in its log, stopped when the environment drops.
    pub fn spawn_process(
        &mut self,
        binary: &str,
        name: &str,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> usize {
        let log = self.data.path().join(format!("{name}.log"));
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .envs(self.env_vars())
            .env("VIDPIPE__WORKER__NAME", name)
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null());
        if std::env::var_os("TEST_LOG").is_some() {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            let file = std::fs::File::create(&log).expect("log file");
            cmd.stdout(file.try_clone().expect("log file")).stderr(file);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        self.workers.push(WorkerProcess {
            name: name.to_owned(),
            child,
            log,
        });
        self.workers.len() - 1
    }

    pub fn worker(&mut self, index: usize) -> &mut WorkerProcess {
        &mut self.workers[index]
    }

    /// Puts a small source object into storage.
    pub async fn put_source(&self, key: &str, bytes: &[u8]) -> StorageKey {
        let key = StorageKey::new(key).expect("valid key");
        self.storage
            .put_bytes(&key, bytes.to_vec())
            .await
            .expect("writing a source");
        key
    }

    /// Copies a local file into storage.
    pub async fn put_source_file(&self, key: &str, file: &Path) -> StorageKey {
        let key = StorageKey::new(key).expect("valid key");
        self.storage
            .put_file(&key, file, &|_| {})
            .await
            .expect("writing a source");
        key
    }

    /// Stores `file` as a new job's source and publishes a `task` job for it with `extra`
    /// fields merged in; returns the job id and its output prefix.
    pub async fn submit_file(
        &self,
        task: &str,
        file: &Path,
        extra: serde_json::Value,
    ) -> (Uuid, StorageKey) {
        let (id, _, prefix) = job_keys(task);
        let source = self
            .put_source_file(&format!("uploads/{id}/source"), file)
            .await;
        let mut job = serde_json::json!({
            "schema": 1, "task": task, "job_id": id,
            "source": source.as_str(), "output_prefix": prefix.as_str(),
        });
        if let (Some(job), Some(extra)) = (job.as_object_mut(), extra.as_object()) {
            job.extend(extra.clone());
        }
        self.publish_raw(task, &serde_json::to_vec(&job).expect("JSON"))
            .await;
        (id, prefix)
    }

    /// Runs `producer ARGS…` in this test's world and returns what it did.
    pub async fn producer(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(bin("producer"))
            .args(args)
            .envs(self.env_vars())
            .kill_on_drop(true)
            .output()
            .await
            .expect("running producer")
    }

    /// Publishes a job to `video_tasks` with a confirm.
    pub async fn publish<J: JobMessage>(&self, job: &J) {
        self.publish_raw(J::TASK, &messages::to_body(job)).await;
    }

    /// Publishes any bytes to `video_tasks` with the given routing key.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.publish_with(
            routing_key,
            body,
            broker::persistent_json(FieldTable::default()),
        )
        .await;
    }

    /// Publishes with explicit message properties.
    pub async fn publish_with(
        &self,
        routing_key: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) {
        broker::publish_confirmed(
            &self.channel,
            &self.topology.tasks_exchange(),
            routing_key,
            body,
            props,
        )
        .await
        .expect("publishing a test job");
    }

    /// A consumer of every event of `job_id`, bound before anything is published.
    pub async fn follow_events(&self, job_id: Uuid) -> EventStream {
        let (channel, consumer) = shared::events::subscribe(
            &self.conn,
            &self.topology.events_exchange(),
            &[format!("job.{job_id}.#")],
            "",
        )
        .await
        .expect("subscribing to the job's events");
        EventStream {
            _channel: channel,
            consumer,
            seen: Vec::new(),
        }
    }

    /// A consumer of every job event of this environment, bound before anything is
    /// published (the order events arrive in is the order workers sent them).
    pub async fn follow_all_events(&self) -> EventStream {
        let (channel, consumer) = shared::events::subscribe(
            &self.conn,
            &self.topology.events_exchange(),
            &["job.#".to_owned()],
            "",
        )
        .await
        .expect("subscribing to every event");
        EventStream {
            _channel: channel,
            consumer,
            seen: Vec::new(),
        }
    }

    /// Waits for the manifest under `prefix`.
    pub async fn wait_manifest(&self, prefix: &StorageKey, timeout: Duration) -> Manifest {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self
                .storage
                .manifest(prefix)
                .await
                .expect("reading manifest")
            {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no manifest under {prefix} within {timeout:?}; worker logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the parking lot holds at least `n` messages, then takes them all.
    pub async fn wait_dead(&self, n: usize, timeout: Duration) -> Vec<DeadLetter> {
        let deadline = Instant::now() + timeout;
        while self.queue_depth(&self.topology.dead()).await < n as u32 {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} dead letters within {timeout:?}; worker logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.take_all(&self.topology.dead()).await
    }

    /// Removes and returns every message of a queue.
    pub async fn take_all(&self, queue: &str) -> Vec<DeadLetter> {
        let channel = self.conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            out.push(DeadLetter {
                body: msg.delivery.data.clone(),
                headers,
            });
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        out
    }

    /// Ready messages in a queue (passive declare).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = channel.close(200, "done".into()).await;
        q.message_count()
    }

    /// Local path of the output named `name` in a manifest (filesystem storage).
    pub fn output_path(&self, manifest: &Manifest, name: &str) -> PathBuf {
        let o = manifest
            .outputs
            .iter()
            .find(|o| o.name == name)
            .unwrap_or_else(|| panic!("no output {name} in {manifest:#?}"));
        self.storage_root().join(o.key.as_str())
    }

    /// Keys stored under `prefix`.
    pub async fn storage_list(&self, prefix: &StorageKey) -> Vec<String> {
        self.storage.list(prefix).await.expect("listing storage")
    }

    /// Whether a manifest exists under `prefix`.
    pub async fn storage_committed(&self, prefix: &StorageKey) -> bool {
        self.storage
            .is_committed(prefix)
            .await
            .expect("checking a manifest")
    }

    /// Every worker log, for failure messages.
    pub fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| format!("--- {} ---\n{}", w.name, w.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        // Delete what we declared, on a private runtime (Drop cannot await).
        let topology = self.topology.clone();
        let url = self.amqp_url.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(conn) = broker::try_connect(&url, "vidpipe-tests-cleanup").await {
                    if let Ok(channel) = conn.create_channel().await {
                        let _ = topology.delete(&channel).await;
                    }
                    let _ = conn.close(200, "done".into()).await;
                }
            });
        })
        .join();
    }
}

/// A message taken from the parking lot.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

impl DeadLetter {
    pub fn reason(&self) -> String {
        shared::runtime::header_str(Some(&self.headers), shared::runtime::REASON_HEADER)
            .unwrap_or_default()
    }
    pub fn attempts(&self) -> Option<u32> {
        shared::runtime::header_u32(Some(&self.headers), shared::runtime::ATTEMPTS_HEADER)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        shared::runtime::header_str(Some(&self.headers), name)
    }
    /// The job id in the parked body.
    pub fn job_id(&self) -> Uuid {
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON body");
        v["job_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("a job id")
    }
}

/// The chaos suites' dead-letter conservation: every dead letter has a reason, exactly
/// the `expected` jobs are parked, each once. Returns the parked jobs' ids.
pub fn assert_dead_exactly(
    dead: &[DeadLetter],
    expected: &std::collections::BTreeSet<Uuid>,
) -> Vec<Uuid> {
    for d in dead {
        assert!(!d.reason().is_empty(), "a dead letter without a reason");
    }
    let ids: Vec<Uuid> = dead.iter().map(DeadLetter::job_id).collect();
    assert_eq!(
        &ids.iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        expected,
        "dead letters: {:?}",
        dead.iter().map(|d| d.reason()).collect::<Vec<_>>()
    );
    assert_eq!(ids.len(), expected.len(), "a job was parked twice");
    ids
}

/// A number from the environment (soak sizes), else `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Events of one job, as they arrive.
pub struct EventStream {
    _channel: Channel,
    consumer: Consumer,
    pub seen: Vec<JobEvent>,
}

impl EventStream {
    /// Waits for an event of `task` in `state`; returns it.
    pub async fn wait_for(&mut self, task: &str, state: JobState, timeout: Duration) -> JobEvent {
        self.wait_for_nth(task, state, 1, timeout).await
    }

    /// Waits for the `n`th (1-based) event of `task` in `state`; returns it.
    pub async fn wait_for_nth(
        &mut self,
        task: &str,
        state: JobState,
        n: usize,
        timeout: Duration,
    ) -> JobEvent {
        let matching = |seen: &[JobEvent]| {
            seen.iter()
                .filter(|e| e.task == task && e.state == state)
                .nth(n - 1)
                .cloned()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = matching(&self.seen) {
                return e;
            }
            let next = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {task} {state:?} event #{n} within {timeout:?}; saw {:?}",
                        self.seen
                    )
                });
            let delivery = next.expect("event stream ended").expect("event delivery");
            let event: JobEvent = serde_json::from_slice(&delivery.data).expect("event JSON");
            self.seen.push(event);
        }
    }
}

impl EventStream {
    /// Takes in whatever events arrive within `period`.
    pub async fn poll(&mut self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout_at(deadline, self.consumer.next()).await
        {
            if let Ok(event) = serde_json::from_slice(&delivery.data) {
                self.seen.push(event);
            }
        }
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` for all of `period` and fails as soon as it returns false: for things
/// that must *not* happen (a message coming back, a port going away).
pub async fn stays(period: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        assert!(check().await, "{what}: no longer true");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh job id and its storage keys (`uploads/<id>/source.bin`, `outputs/<id>/<task>/`).
pub fn job_keys(task: &str) -> (Uuid, String, StorageKey) {
    let id = Uuid::new_v4();
    (
        id,
        format!("uploads/{id}/source.bin"),
        StorageKey::output_prefix(id, task).expect("valid prefix"),
    )
}

/// A test-worker job body (`TestJob` of `tests/support/testworker.rs`) as JSON, with
/// `extra` fields (`work_ms`, `fail_attempts`, `permanent`) merged in.
pub fn test_job(id: Uuid, source: &str, prefix: &StorageKey, extra: serde_json::Value) -> Vec<u8> {
    let mut job = serde_json::json!({
        "schema": 1, "task": "transcode", "job_id": id,
        "source": source, "output_prefix": prefix.as_str(),
    });
    if let (Some(job), Some(extra)) = (job.as_object_mut(), extra.as_object()) {
        job.extend(extra.clone());
    }
    serde_json::to_vec(&job).expect("JSON")
}
