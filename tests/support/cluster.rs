//! A private three-node RabbitMQ cluster for node-loss tests, beside the machine's own
//! broker and never touching it (`../shared/CLUSTER-CI.md` has the measured recipe): its
//! own node names, AMQP and distribution ports, directories and Erlang cookie (in its own
//! `HOME`), so `rabbitmqctl` cannot reach the shared broker by mistake.
//!
//! The three nodes start together and form the cluster by themselves (classic-config
//! peer discovery, no join commands); [`Cluster::start`] returns once all three run as
//! one. Dropping the cluster thaws any frozen node and stops all three, killing what does
//! not stop, then removes their files: a failing test leaves nothing running.
//!
//! Settings made for tests (each said where it matters): the Erlang distribution tick is
//! `net_ticktime` = [`NET_TICKTIME_SECS`] instead of 60 s, so a frozen node is declared
//! down in about that long; `cluster_partition_handling = autoheal`, so a node thawed
//! after being declared down restarts itself and rejoins (as production clusters that
//! can be partitioned should be configured); and the at-least-once dead-letter worker's
//! confirm timeout is [`DLX_CONFIRM_TIMEOUT_MS`] instead of two minutes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The nodes' Erlang distribution tick, seconds: a node that answers nothing for about
/// this long is declared down by the others (default 60).
pub const NET_TICKTIME_SECS: u64 = 10;

/// How long a quorum queue's at-least-once dead-letter worker waits for the target's
/// confirm before it sends again, ms (RabbitMQ's default is 120 000: a retry whose
/// return to `video_tasks` was in flight when a node was lost would wait two minutes).
pub const DLX_CONFIRM_TIMEOUT_MS: u64 = 5000;

/// A running three-node cluster; stopped (and its files removed) on drop.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    dir: TempDir,
    sbin: PathBuf,
    ctl_ports: (u16, u16),
}

/// One node of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// `vpc<port>@localhost`.
    pub name: String,
    /// AMQP port on 127.0.0.1.
    pub port: u16,
    /// Erlang distribution port.
    pub dist_port: u16,
}

/// Where the RabbitMQ server scripts live, if they are installed (`scripts/setup.sh`
/// installs them; the node-loss test skips, saying so, without them).
pub fn server_scripts() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("sbin"))
        .find(|p| p.join("rabbitmq-server").is_file() && p.join("rabbitmqctl").is_file())
}

impl Cluster {
    /// Starts three nodes listening on 127.0.0.1:`ports[i]` with distribution ports
    /// `dist_ports[i]`, `rabbitmqctl` using `ctl_ports` (an inclusive range), all started
    /// at once; blocks until the three run as one cluster (about 25-30 s).
    pub fn start(
        sbin: PathBuf,
        ports: [u16; 3],
        dist_ports: [u16; 3],
        ctl_ports: (u16, u16),
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vidpipe-cluster-")
            .tempdir()
            .expect("cluster dir");
        let nodes: Vec<ClusterNode> = ports
            .iter()
            .zip(dist_ports)
            .map(|(&port, dist_port)| ClusterNode {
                name: format!("vpc{port}@localhost"),
                port,
                dist_port,
            })
            .collect();
        let cluster = Self {
            nodes,
            dir,
            sbin,
            ctl_ports,
        };
        let home = cluster.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("VIDPIPECLUSTER{}", ports[0])).unwrap();
        let mut perms = std::fs::metadata(&cookie).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
        std::fs::set_permissions(&cookie, perms).unwrap();
        let peers: String = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "cluster_formation.classic_config.nodes.{} = {}\n",
                    i + 1,
                    n.name
                )
            })
            .collect();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let base = cluster.node_dir(i);
            for sub in ["mnesia", "log", "plugins-expand"] {
                std::fs::create_dir_all(base.join(sub)).unwrap();
            }
            std::fs::write(
                base.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n\
                     log.file.level = warning\n\
                     cluster_formation.peer_discovery_backend = classic_config\n{peers}\
                     cluster_partition_handling = autoheal\n",
                    node.port
                ),
            )
            .unwrap();
            std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
            std::fs::write(
                base.join("advanced.config"),
                format!(
                    "[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, \
                     {DLX_CONFIRM_TIMEOUT_MS}}}]}}].\n"
                ),
            )
            .unwrap();
        }
        // Together: each node waits for the others to form the cluster.
        std::thread::scope(|s| {
            for i in 0..3 {
                let cluster = &cluster;
                s.spawn(move || cluster.start_node(i));
            }
        });
        let out = cluster.ctl(0, &["await_online_nodes", "3", "--timeout", "60"]);
        assert!(
            out.status.success(),
            "the cluster did not form: {}",
            text(&out)
        );
        cluster
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` of node `i`, with `query` appended
    /// (`?heartbeat=4`, or empty).
    pub fn amqp_url(&self, i: usize, query: &str) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f{query}",
            self.nodes[i].port
        )
    }

    /// Every node's URL, comma separated in the order given (for `amqp.urls`).
    pub fn urls(&self, order: &[usize], query: &str) -> String {
        order
            .iter()
            .map(|&i| self.amqp_url(i, query))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Which node listens on `port`.
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Which node `name` (`vpc…@localhost`) is.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Starts node `i` (again, after [`Self::kill`]) and waits until it answers.
    pub fn start_node(&self, i: usize) {
        let out = self.run(i, "rabbitmq-server", &["-detached"]);
        assert!(
            out.status.success(),
            "starting {}: {}",
            self.nodes[i].name,
            text(&out)
        );
        let pid = self.pid_file(i);
        let out = self.ctl(i, &["wait", pid.to_str().unwrap(), "--timeout", "90"]);
        assert!(
            out.status.success(),
            "{} did not start: {}",
            self.nodes[i].name,
            text(&out)
        );
    }

    /// Waits until all three nodes run as one cluster again, as node `from` sees it.
    pub fn await_all_running(&self, from: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ctl(from, &["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
                .unwrap_or(0);
            if running == 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come back together within {timeout:?}: {}",
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs `rabbitmqctl -n <node i> <args>`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.nodes[i].name.as_str()];
        all.extend_from_slice(args);
        self.run(i, "rabbitmqctl", &all)
    }

    /// The node leading quorum queue `queue`, asking node `via`.
    pub fn leader(&self, via: usize, queue: &str) -> Option<usize> {
        self.queue_info(via, queue, "leader")
            .and_then(|name| self.node_named(&name))
    }

    /// The members of quorum queue `queue` (node names), asking node `via`.
    pub fn members(&self, via: usize, queue: &str) -> Vec<String> {
        self.queue_info(via, queue, "members")
            .map(|list| {
                list.trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|m| m.trim().trim_matches('\'').to_owned())
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One column of `list_queues` for `queue`.
    fn queue_info(&self, via: usize, queue: &str, column: &str) -> Option<String> {
        let out = self.ctl(
            via,
            &["list_queues", "name", column, "--formatter", "json", "-q"],
        );
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        let row = rows.iter().find(|r| r["name"] == queue)?;
        Some(match &row[column] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .filter_map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            other => other.to_string(),
        })
    }

    /// Every queue as node `via` sees it (messages, ready, unacked, leader, members,
    /// online members), for failure messages.
    pub fn queues_report(&self, via: usize) -> String {
        text(&self.ctl(
            via,
            &[
                "list_queues",
                "name",
                "type",
                "messages",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                "leader",
                "online",
                "-q",
            ],
        ))
    }

    /// The node's operating-system process id (its pid file).
    pub fn os_pid(&self, i: usize) -> u32 {
        std::fs::read_to_string(self.pid_file(i))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid file for {}", self.nodes[i].name))
    }

    /// `kill -9` of node `i`'s Erlang VM: the node is gone at once, nothing flushed.
    pub fn kill(&self, i: usize) {
        signal(self.os_pid(i), "KILL");
    }

    /// SIGSTOP: the node's VM is frozen (a hung host): its sockets stay open, nothing
    /// answers.
    pub fn freeze(&self, i: usize) {
        signal(self.os_pid(i), "STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self, i: usize) {
        signal(self.os_pid(i), "CONT");
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{}", self.nodes[i].port))
    }

    fn pid_file(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("node.pid")
    }

    /// Runs a server script for node `i` with its own environment.
    fn run(&self, i: usize, script: &str, args: &[&str]) -> Output {
        let node = &self.nodes[i];
        let base = self.node_dir(i);
        let p = |sub: &str| base.join(sub).display().to_string();
        Command::new(self.sbin.join(script))
            .args(args)
            .env("HOME", self.dir.path().join("home"))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_BASE", p(""))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file(i).display().to_string())
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", p("plugins-expand"))
            .env("RABBITMQ_CTL_DIST_PORT_MIN", self.ctl_ports.0.to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MAX", self.ctl_ports.1.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                format!(
                    "-kernel inet_dist_use_interface {{127,0,0,1}} -kernel net_ticktime {NET_TICKTIME_SECS}"
                ),
            )
            .output()
            .unwrap_or_else(|e| panic!("running {script}: {e}"))
    }

    /// The node's log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        let path = self
            .node_dir(i)
            .join("log")
            .join(format!("{}.log", self.nodes[i].name));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Directory of the cluster's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        std::thread::scope(|s| {
            for i in 0..self.nodes.len() {
                let cluster = &*self;
                s.spawn(move || {
                    let pid = std::fs::read_to_string(cluster.pid_file(i))
                        .ok()
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    if let Some(pid) = pid {
                        signal_quietly(pid, "CONT");
                    }
                    let file = cluster.pid_file(i);
                    let stopped = cluster
                        .ctl(
                            i,
                            &["stop", file.to_str().unwrap_or_default(), "--timeout", "30"],
                        )
                        .status
                        .success();
                    if !stopped && let Some(pid) = pid {
                        signal_quietly(pid, "KILL");
                    }
                });
            }
        });
    }
}

/// `kill -<signal> <pid>`, which must succeed.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// `kill -<signal> <pid>`, whatever happens (cleanup).
fn signal_quietly(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
