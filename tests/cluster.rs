//! Node loss on a real three-node RabbitMQ cluster (`support::cluster`), with real worker
//! processes that list all three nodes in `amqp.urls`. While jobs run, the node leading
//! the work queue is killed (`kill -9`) and later restarted; then the new leader is frozen
//! (SIGSTOP) for longer than the Erlang tick and thawed. Afterwards, as in `chaos.rs`,
//! every job must be in exactly one terminal state — completed with whole outputs, or
//! dead with a reason, the dead ones exactly those built to fail — and none lost. Also:
//! workers were connected to the lost node and moved to another one, and the time from
//! each node loss to the first job completed after it is printed.
//!
//! The cluster runs with `net_ticktime` = 10 s (not 60) and autoheal partition handling,
//! and the workers' URLs ask for 4 s AMQP heartbeats, so a frozen node costs seconds of
//! CI time rather than minutes (`support::cluster` says why each is set).
//!
//! CI-sized here (40 jobs); `CHAOS_JOBS=200 cargo test --test integration cluster:: --
//! --nocapture` is the soak (4 × `CHAOS_JOBS` jobs), like `chaos.rs`. Skips, saying why,
//! only when the RabbitMQ server scripts are not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use shared::manifest::Manifest;
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::support::cluster::{Cluster, NET_TICKTIME_SECS, server_scripts};
use crate::support::{DeadLetter, TestEnv, assert_dead_exactly, env_number, job_keys, test_job};

/// AMQP, Erlang distribution and `rabbitmqctl` ports: clear of the machine's broker
/// (5672/25672), `chaos.rs` (5681/25681, 25781-25791) and `tls.rs` (5691/25691,
/// 25791-25801).
const PORTS: [u16; 3] = [5711, 5712, 5713];
const DIST_PORTS: [u16; 3] = [25711, 25712, 25713];
const CTL_PORTS: (u16, u16) = (25721, 25740);
/// The workers' URLs: AMQP heartbeats every 4 s, so a frozen node is noticed in ~8 s.
const QUERY: &str = "?heartbeat=4";
const WORKERS: usize = 3;
const WORK_MS: u64 = 1200;

/// One submitted job and what it should become.
struct Job {
    id: Uuid,
    prefix: StorageKey,
    source: Vec<u8>,
    /// Built to fail permanently: must end dead.
    dead: bool,
}

/// Publishes `count` test jobs: every tenth fails permanently (ends dead), every
/// fourth fails its first attempt (goes through a retry tier), the rest just work.
async fn submit(env: &TestEnv, jobs: &mut Vec<Job>, count: usize) {
    for _ in 0..count {
        let n = jobs.len();
        let (id, source_key, prefix) = job_keys("transcode");
        let source = format!("job {n} {id}").into_bytes();
        env.put_source(&source_key, &source).await;
        let dead = n % 10 == 9;
        let extra = json!({
            "work_ms": WORK_MS,
            "permanent": dead,
            "fail_attempts": u32::from(n % 4 == 1),
        });
        env.publish_raw("transcode", &test_job(id, &source_key, &prefix, extra))
            .await;
        jobs.push(Job {
            id,
            prefix,
            source,
            dead,
        });
    }
}

/// Manifests seen so far, with when the test first saw each.
#[derive(Default)]
struct Completions {
    seen: BTreeMap<Uuid, (Manifest, Instant)>,
}

impl Completions {
    async fn poll(&mut self, env: &TestEnv, jobs: &[Job]) {
        for job in jobs.iter().filter(|j| !j.dead) {
            if !self.seen.contains_key(&job.id)
                && let Some(m) = env.storage.manifest(&job.prefix).await.unwrap()
            {
                self.seen.insert(job.id, (m, Instant::now()));
            }
        }
    }
    /// How long after `t` the first job *started* after `t` completed (by one of
    /// `workers` if given): a job delivered after a node loss, so by a live node, not one
    /// that was already running on a worker of the lost node (its outputs are written
    /// even though its ack is lost). Start = seen − handler time, to the 0.1 s polling.
    fn first_after(&self, t: Instant, workers: Option<&BTreeSet<String>>) -> Option<Duration> {
        self.seen
            .values()
            .filter(|(m, _)| workers.is_none_or(|w| w.contains(&m.completion.worker)))
            .filter(|(m, at)| {
                at.checked_sub(Duration::from_secs_f64(m.completion.duration_s))
                    .is_some_and(|start| start >= t)
            })
            .filter_map(|(_, at)| at.checked_duration_since(t))
            .min()
    }
}

/// The nodes (by AMQP port) a worker's log says it connected to, in order.
fn connections(log: &str) -> Vec<u16> {
    log.lines()
        .filter(|l| l.contains("connected to the broker"))
        .filter_map(|l| {
            let rest = &l[l.find("127.0.0.1:")? + "127.0.0.1:".len()..];
            rest.get(..4)?.parse().ok()
        })
        .collect()
}

/// Each worker's name and the nodes (ports) it connected to so far, in order.
fn worker_connections(env: &mut TestEnv) -> Vec<(String, Vec<u16>)> {
    (0..WORKERS)
        .map(|i| {
            let w = env.worker(i);
            (w.name.clone(), connections(&w.log_text()))
        })
        .collect()
}

/// Which workers are connected to node `port` now (their latest connection).
fn workers_on(env: &mut TestEnv, port: u16) -> BTreeSet<String> {
    worker_connections(env)
        .into_iter()
        .filter(|(_, ports)| ports.last() == Some(&port))
        .map(|(name, _)| name)
        .collect()
}

/// Which of `were_on` (workers on node `port` when it was lost) are now on another node.
fn moved(env: &mut TestEnv, were_on: &BTreeSet<String>, port: u16) -> BTreeSet<String> {
    worker_connections(env)
        .into_iter()
        .filter(|(name, ports)| {
            were_on.contains(name) && ports.len() >= 2 && ports.last() != Some(&port)
        })
        .map(|(name, _)| name)
        .collect()
}

/// Moves the test's own connection to node `to` (off a node about to be lost).
async fn move_env(env: &mut TestEnv, cluster: &Cluster, to: usize) {
    env.amqp_url = cluster.amqp_url(to, "");
    env.reconnect().await;
}

/// Waits until at least `n` jobs completed, polling; panics with the logs after `timeout`.
async fn wait_completed(
    env: &TestEnv,
    jobs: &[Job],
    done: &mut Completions,
    n: usize,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while done.seen.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs completed within {timeout:?}\n{}",
            done.seen.len(),
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        done.poll(env, jobs).await;
    }
}

/// Polls completions for `period` (so first-completion times are seen to 0.1 s).
async fn watch(env: &TestEnv, jobs: &[Job], done: &mut Completions, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        done.poll(env, jobs).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "none".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_is_lost_when_cluster_nodes_are_killed_and_frozen() {
    let Some(sbin) = server_scripts() else {
        println!(
            "skipping the node-loss test: the RabbitMQ server scripts \
             (/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin) are not installed; \
             scripts/setup.sh installs them"
        );
        return;
    };
    let total = env_number("CHAOS_JOBS", 10) as usize * 4;
    let started = Instant::now();
    let cluster =
        tokio::task::spawn_blocking(move || Cluster::start(sbin, PORTS, DIST_PORTS, CTL_PORTS))
            .await
            .unwrap();
    let formed = started.elapsed();
    let cluster = std::sync::Arc::new(cluster);
    let ctl = |f: Box<dyn FnOnce(&Cluster) + Send>| {
        let cluster = cluster.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&cluster))
                .await
                .unwrap();
        }
    };

    // The topology is declared through node 0, so node 0 leads its quorum queues.
    let mut env = TestEnv::on_broker(&cluster.amqp_url(0, "")).await;
    let queue = env.topology.work_queue("transcode");
    let mut replicated = vec![queue.clone(), env.topology.dead()];
    replicated.extend((0..env.topology.retry_tiers()).map(|t| env.topology.retry(t)));
    for q in &replicated {
        let members = cluster.members(0, q);
        assert_eq!(
            members.len(),
            3,
            "{q} is replicated on every node: {members:?}"
        );
    }
    let leader = cluster
        .leader(0, &queue)
        .expect("the work queue has a leader");

    // Workers: each lists all three nodes, starting with a different one.
    let list = |first: usize| {
        let order: Vec<usize> = (0..3).map(|k| (first + k) % 3).collect();
        cluster.urls(&order, QUERY)
    };
    env.use_broker_list(&list(0));
    for w in 0..WORKERS {
        let urls = list(w % 3);
        env.spawn_worker(
            "vidpipe-testworker",
            &format!("node-loss-{w}"),
            &[
                ("VIDPIPE__AMQP__URLS", urls.as_str()),
                ("VIDPIPE__AMQP__CONNECT_TIMEOUT_SECS", "3"),
                ("VIDPIPE__WORKER__CONCURRENCY", "2"),
            ],
        );
    }
    let mut jobs = Vec::new();
    let mut done = Completions::default();

    // Phase 1: kill -9 the work queue's leader while jobs run, then bring it back.
    let first_batch = total * 3 / 5;
    move_env(&mut env, &cluster, (leader + 1) % 3).await;
    submit(&env, &mut jobs, first_batch).await;
    wait_completed(&env, &jobs, &mut done, 4, Duration::from_secs(60)).await;
    let on_killed = workers_on(&mut env, PORTS[leader]);
    done.poll(&env, &jobs).await;
    let killed_at = Instant::now();
    ctl(Box::new(move |c| c.kill(leader))).await;
    watch(&env, &jobs, &mut done, Duration::from_secs(6)).await;
    let after_kill = done.first_after(killed_at, None);
    ctl(Box::new(move |c| {
        c.start_node(leader);
        c.await_all_running((leader + 1) % 3, Duration::from_secs(60));
    }))
    .await;
    let moved_after_kill = done.first_after(killed_at, Some(&on_killed));
    let kill_moves = moved(&mut env, &on_killed, PORTS[leader]);

    // Phase 2: freeze the new leader for longer than the Erlang tick, then thaw it
    // (autoheal restarts it and it rejoins).
    let frozen = cluster
        .leader((leader + 1) % 3, &queue)
        .expect("a new leader");
    if env.amqp_url == cluster.amqp_url(frozen, "") {
        move_env(&mut env, &cluster, (frozen + 1) % 3).await;
    }
    submit(&env, &mut jobs, total - first_batch).await;
    watch(&env, &jobs, &mut done, Duration::from_secs(2)).await;
    let on_frozen = workers_on(&mut env, PORTS[frozen]);
    done.poll(&env, &jobs).await;
    let frozen_at = Instant::now();
    let freeze_started = started.elapsed();
    ctl(Box::new(move |c| c.freeze(frozen))).await;
    let freeze_for = Duration::from_secs(NET_TICKTIME_SECS * 3 / 2 + 3);
    watch(&env, &jobs, &mut done, freeze_for).await;
    ctl(Box::new(move |c| c.thaw(frozen))).await;
    let after_freeze = done.first_after(frozen_at, None);
    let frozen_moves = moved(&mut env, &on_frozen, PORTS[frozen]);
    let moved_after_freeze = done.first_after(frozen_at, Some(&on_frozen));
    // The thawed node heals in the background (autoheal restarts it) while jobs settle.
    let healing = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            cluster.await_all_running((frozen + 1) % 3, Duration::from_secs(150));
            started.elapsed()
        })
    };
    let ok = jobs.iter().filter(|j| !j.dead).count();
    let expect_dead: BTreeSet<Uuid> = jobs.iter().filter(|j| j.dead).map(|j| j.id).collect();
    let mut dead: Vec<crate::support::DeadLetter> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        done.poll(&env, &jobs).await;
        dead.extend(env.take_all(&env.topology.dead()).await);
        if done.seen.len() + dead.len() >= jobs.len() {
            break;
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = jobs
                .iter()
                .filter(|j| !j.dead && !done.seen.contains_key(&j.id))
                .map(|j| j.id.to_string())
                .collect();
            let c = cluster.clone();
            let report = tokio::task::spawn_blocking(move || {
                (0..3)
                    .map(|i| {
                        format!(
                            "--- queues via node {i} ---\n{}\n--- node {i} log ---\n{}",
                            c.queues_report(i),
                            c.log(i)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .await
            .unwrap();
            panic!(
                "after node loss only {} completed and {} dead of {}; missing {missing:?}\n{}\n{report}",
                done.seen.len(),
                dead.len(),
                jobs.len(),
                env.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A little longer: nothing else may turn up (no job in two terminal states).
    let settled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    dead.extend(env.take_all(&env.topology.dead()).await);
    let healed = healing.await.unwrap();
    let thawed_at = freeze_started + freeze_for;
    if healed > thawed_at + Duration::from_secs(30) {
        let c = cluster.clone();
        let log = tokio::task::spawn_blocking(move || c.log(frozen))
            .await
            .unwrap();
        // RabbitMQ 3.10's autoheal sometimes waits its 60 s safe-to-start timeout.
        let autoheal: Vec<&str> = log.lines().filter(|l| l.contains("Autoheal")).collect();
        println!(
            "the thawed node took {:.0} s to rejoin:\n{}",
            (healed - thawed_at).as_secs_f64(),
            autoheal.join("\n")
        );
    }

    let dead_ids: Vec<Uuid> = dead.iter().map(DeadLetter::job_id).collect();
    let lost = jobs.len() - done.seen.len() - dead_ids.iter().collect::<BTreeSet<_>>().len();
    println!(
        "node loss: {} jobs on a 3-node cluster (formed in {:.1} s, freeze at {:.0} s), {} completed, {} dead, \
         {lost} lost; killed {} (leader; workers on it {:?}, moved {:?}), first job started \
         after the kill completed {} after it ({} by a moved worker); froze {} for {:?} \
         (workers on it {:?}, moved {:?}), first job started after the freeze completed {} \
         after it ({} by a moved worker); the thawed node back in the cluster at {:.0} s, \
         every job settled at {:.0} s",
        jobs.len(),
        formed.as_secs_f64(),
        freeze_started.as_secs_f64(),
        done.seen.len(),
        dead.len(),
        cluster.nodes[leader].name,
        on_killed,
        kill_moves,
        secs(after_kill),
        secs(moved_after_kill),
        cluster.nodes[frozen].name,
        freeze_for,
        on_frozen,
        frozen_moves,
        secs(after_freeze),
        secs(moved_after_freeze),
        healed.as_secs_f64(),
        settled.as_secs_f64(),
    );
    assert_dead_exactly(&dead, &expect_dead);
    assert_eq!(done.seen.len(), ok, "a job was lost");
    assert!(
        !on_killed.is_empty() && kill_moves == on_killed,
        "every worker on the killed node moved to another: on it {on_killed:?}, moved \
         {kill_moves:?}\n{}",
        env.logs()
    );
    assert!(
        frozen_moves == on_frozen,
        "every worker on the frozen node moved to another: on it {on_frozen:?}, moved \
         {frozen_moves:?}\n{}",
        env.logs()
    );
    assert!(
        after_kill.is_some(),
        "no job started and completed after the kill"
    );
    assert!(
        after_freeze.is_some(),
        "no job started and completed after the freeze"
    );

    // Every completed job's output is whole: the manifest's size, the source's bytes.
    for job in jobs.iter().filter(|j| !j.dead) {
        let (manifest, _) = &done.seen[&job.id];
        assert_eq!(manifest.completion.job_id, job.id);
        for o in &manifest.outputs {
            let bytes = std::fs::read(env.storage_root().join(o.key.as_str())).unwrap();
            assert_eq!(bytes.len() as u64, o.size_bytes, "{} half-written", o.key);
            assert_eq!(bytes, job.source, "{} is not its source's copy", o.key);
        }
    }
    drop(env);
    drop(cluster);
}
