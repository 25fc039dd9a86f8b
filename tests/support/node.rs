//! A private RabbitMQ node for tests that restart or reconfigure the broker (chaos, TLS),
//! started beside the machine's own broker and never touching it (`../shared/CLUSTER-CI.md`
//! has the measured recipe): its own port, distribution port, node name, directories and
//! Erlang cookie, so `rabbitmqctl` cannot reach the shared broker by mistake.
//!
//! Starting a node takes about ten seconds; tests that need one share nothing else with
//! the other tests.
//!
//! With `VIDPIPE_TEST_RABBITMQ_ROOTFS` set to the root filesystem of
//! `tests/rabbitmq4/node.sh` (Debian trixie's RabbitMQ 4.x and its own Erlang, with `/proc`
//! mounted: `node.sh start` does it), the node is that RabbitMQ run in a chroot instead of
//! the machine's own one: the test command's RabbitMQ 4.x pass runs the chaos suite so.
//! Its files are then under the rootfs's `/tmp`, and it registers with the 4.x node's
//! own epmd (`VIDPIPE_RABBITMQ4_EPMD_PORT`, default 4370). Needs root (chroot).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running private node; stopped (and its files removed) on drop.
pub struct PrivateNode {
    pub name: String,
    pub port: u16,
    dir: TempDir,
    /// The server's `sbin` as the node sees it (inside the chroot in rootfs mode).
    sbin: PathBuf,
    /// The chroot of rootfs mode (see the module's doc), else `None`.
    rootfs: Option<PathBuf>,
}

impl PrivateNode {
    /// Starts node `vp<port>@localhost` listening on 127.0.0.1:`port` (plain AMQP) with
    /// `extra_conf` appended to its `rabbitmq.conf` (e.g. a TLS listener). Blocks until it
    /// answers.
    pub fn start(port: u16, extra_conf: &str) -> Self {
        let rootfs = std::env::var_os("VIDPIPE_TEST_RABBITMQ_ROOTFS").map(PathBuf::from);
        let root = rootfs.clone().unwrap_or_else(|| PathBuf::from("/"));
        if rootfs.is_some() {
            assert!(
                root.join("proc/self").exists(),
                "{}/proc is not mounted: start the 4.x node first (tests/rabbitmq4/node.sh start)",
                root.display()
            );
        }
        let sbin = std::fs::read_dir(root.join("usr/lib/rabbitmq/lib"))
            .expect("rabbitmq-server is installed (scripts/setup.sh, or the rootfs)")
            .filter_map(Result::ok)
            .map(|e| e.path().join("sbin"))
            .find(|p| p.join("rabbitmq-server").is_file())
            .expect("rabbitmq_server-*/sbin");
        let sbin = Path::new("/").join(sbin.strip_prefix(&root).expect("under the root"));
        let dir = tempfile::Builder::new()
            .prefix("vidpipe-node-")
            .tempdir_in(root.join("tmp"))
            .expect("node dir");
        let node = Self {
            name: format!("vp{port}@localhost"),
            port,
            dir,
            sbin,
            rootfs,
        };
        let base = node.dir.path();
        for sub in ["home", "mnesia", "log", "plugins-expand"] {
            std::fs::create_dir_all(base.join(sub)).unwrap();
        }
        let cookie = base.join("home/.erlang.cookie");
        std::fs::write(&cookie, format!("VIDPIPETESTNODE{port}")).unwrap();
        let mut perms = std::fs::metadata(&cookie).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o400);
        std::fs::set_permissions(&cookie, perms).unwrap();
        std::fs::write(
            base.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n\
                 log.file.level = warning\n{extra_conf}\n"
            ),
        )
        .unwrap();
        std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(base.join("advanced.config"), "[].\n").unwrap();
        let out = node.run("rabbitmq-server", &["-detached"]);
        assert!(
            out.status.success(),
            "starting {}: {}",
            node.name,
            text(&out)
        );
        let pid = node.pid_file();
        let out = node.ctl(&["wait", pid.to_str().unwrap(), "--timeout", "60"]);
        assert!(
            out.status.success(),
            "{} did not start: {}",
            node.name,
            text(&out)
        );
        node
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n <node> <args>` against this node only.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        self.run("rabbitmqctl", &all)
    }

    /// `rabbitmqctl stop_app` then, after `down`, `start_app`: the broker restarts while
    /// the Erlang node (and its data) stays.
    pub fn restart_app(&self, down: Duration) {
        let out = self.ctl(&["stop_app"]);
        assert!(out.status.success(), "stop_app: {}", text(&out));
        std::thread::sleep(down);
        let out = self.ctl(&["start_app"]);
        assert!(out.status.success(), "start_app: {}", text(&out));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not come back", self.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Directory for files the node's configuration refers to (certificates, …). In
    /// rootfs mode the node sees it elsewhere (under its `/tmp`): not for such files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node's directory as the node sees it (inside the chroot in rootfs mode).
    fn inner_dir(&self) -> PathBuf {
        match &self.rootfs {
            Some(root) => Path::new("/").join(self.dir.path().strip_prefix(root).unwrap()),
            None => self.dir.path().to_path_buf(),
        }
    }

    /// The pid file, as the node and `rabbitmqctl` see it.
    fn pid_file(&self) -> PathBuf {
        self.inner_dir().join("node.pid")
    }

    fn run(&self, script: &str, args: &[&str]) -> Output {
        let base = self.inner_dir();
        let p = |sub: &str| base.join(sub).display().to_string();
        let dist = self.port + 20000;
        let mut cmd = match &self.rootfs {
            Some(root) => {
                let mut cmd = Command::new("chroot");
                cmd.arg(root).arg(self.sbin.join(script));
                // The 4.x node's own epmd, never the machine's.
                let epmd =
                    std::env::var("VIDPIPE_RABBITMQ4_EPMD_PORT").unwrap_or_else(|_| "4370".into());
                cmd.env("ERL_EPMD_PORT", epmd)
                    .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
                cmd
            }
            None => Command::new(self.sbin.join(script)),
        };
        cmd.args(args)
            .env("HOME", p("home"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_BASE", p(""))
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file().display().to_string())
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", p("plugins-expand"))
            .env("RABBITMQ_CTL_DIST_PORT_MIN", (dist + 100).to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MAX", (dist + 110).to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .output()
            .unwrap_or_else(|e| panic!("running {script}: {e}"))
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let pid = self.pid_file();
        let _ = self.ctl(&["stop", pid.to_str().unwrap_or_default()]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
