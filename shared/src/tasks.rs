//! The task registry: every task kind vidpipe runs, declared once.
//!
//! A [`TaskKind`] says everything the rest of the tree needs to know about a task: its
//! name (which is also its routing key, its work queue's suffix, the `task` field of its
//! messages and its output folder), its message type, whether its source must have a
//! video stream, and the broker role that runs it. From the [`Registry`] come the
//! topology (one quorum work queue per kind), the producer's job plan, and the
//! least-privilege broker users ([`broker_roles`]: what `scripts/rabbitmq-users.sh` and
//! the compose stack's generated broker definitions apply, printed by `producer tasks`).
//!
//! Adding a worker kind is a new crate whose message type names its `TaskKind` in
//! [`JobMessage::KIND`](crate::messages::JobMessage::KIND), plus one line in [`BUILTIN`].
//! A kind that is not in `BUILTIN` (the integration tests' `copy` kind) still works: the
//! worker runtime adds its own handler's kind to the registry it declares, so a test-only
//! kind never reaches production topology.

use serde::Serialize;

use crate::priority::Priority;
use crate::topology::Topology;

/// One task kind. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TaskKind {
    /// Task name: routing key on `video_tasks`, work queue `video_tasks.<name>`, the
    /// messages' `task` field, outputs under `outputs/<job_id>/<name>/`.
    pub name: &'static str,
    /// The Rust message type (for people reading `producer tasks`).
    pub message: &'static str,
    /// Whether the source must have a video stream (a loudness task would not).
    pub needs_video: bool,
    /// Whether its jobs split into parts published by the worker itself (see
    /// [`crate::split`]): only then may its role publish to the tasks exchange.
    pub fans_out: bool,
    /// The broker role running it: RabbitMQ user `vidpipe-<role>`, password variable
    /// `VIDPIPE_<ROLE>_PASSWORD`, worker binary and compose service `<role>`, secrets
    /// volume `secrets-<role>`.
    pub role: &'static str,
}

impl TaskKind {
    /// The routing key jobs of this kind are published with (the name).
    pub const fn routing_key(&self) -> &'static str {
        self.name
    }
    /// The RabbitMQ user of its role.
    pub fn user(&self) -> String {
        format!("vidpipe-{}", self.role)
    }
}

/// `transcode`: the source into an MP4/HLS/CMAF rendition ladder (H.264, HEVC, AV1).
pub const TRANSCODE: TaskKind = TaskKind {
    name: "transcode",
    message: "TranscodeJob",
    needs_video: true,
    fans_out: true,
    role: "transcoder",
};

/// `thumbnail`: a poster, thumbnails and a sprite sheet.
pub const THUMBNAIL: TaskKind = TaskKind {
    name: "thumbnail",
    message: "ThumbnailJob",
    needs_video: true,
    fans_out: false,
    role: "thumbnailer",
};

/// Every production task kind, in publishing order. Adding a kind is one line here.
pub const BUILTIN: &[TaskKind] = &[TRANSCODE, THUMBNAIL];

/// The builtin kinds' names, in order (for code that only walks the names).
pub const BUILTIN_NAMES: [&str; BUILTIN.len()] = {
    let mut names = [""; BUILTIN.len()];
    let mut i = 0;
    while i < BUILTIN.len() {
        names[i] = BUILTIN[i].name;
        i += 1;
    }
    names
};

/// A set of task kinds: the builtin ones, plus any a process adds for itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    kinds: Vec<TaskKind>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Registry {
    /// The production kinds ([`BUILTIN`]).
    pub fn builtin() -> Self {
        Self {
            kinds: BUILTIN.to_vec(),
        }
    }

    /// This registry with `kind` added after the others (no change if a kind of that
    /// name is there already).
    ///
    /// # Panics
    /// If a different kind of the same name is registered: two kinds sharing a queue
    /// would consume each other's jobs as poison.
    pub fn with(mut self, kind: TaskKind) -> Self {
        match self.get(kind.name) {
            Some(existing) => assert_eq!(
                *existing, kind,
                "task kind `{}` is registered twice, differently",
                kind.name
            ),
            None => self.kinds.push(kind),
        }
        self
    }

    /// Every kind, in registration order.
    pub fn kinds(&self) -> &[TaskKind] {
        &self.kinds
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Option<&TaskKind> {
        self.kinds.iter().find(|k| k.name == name)
    }

    /// Task names, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.iter().map(|k| k.name)
    }
}

/// One RabbitMQ user with its tags and permission regexes on one vhost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerRole {
    /// `producer`, `transcoder`, …, `ops`: the secrets directory and password variable.
    pub role: String,
    /// `vidpipe-<role>`.
    pub user: String,
    /// RabbitMQ user tags (`management` for ops, else empty).
    pub tags: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// The least-privilege users for `registry` under `topology`'s prefix: the producer
/// (publishes jobs and cancel requests, reads events through its own server-named
/// queues), one user per worker role (reads its kinds' queues; writes the parts of split
/// jobs to the tasks exchange, retries, dead letters and events; configures only its own
/// server-named control queue, bound to the events exchange), and ops (declares the topology, administers dead letters).
pub fn broker_roles(registry: &Registry, topology: &Topology) -> Vec<BrokerRole> {
    let re = |name: String| regex_escape(&name);
    let events = re(topology.events_exchange());
    let tasks = re(topology.tasks_exchange());
    let dead = re(topology.dead());
    let retries = format!("{}.*", re(format!("{}.retry.", topology.tasks_exchange())));
    let own_queues = r"amq\.gen-.*";
    let role =
        |name: &str, tags: &str, configure: String, write: String, read: String| BrokerRole {
            role: name.to_owned(),
            user: format!("vidpipe-{name}"),
            tags: tags.to_owned(),
            configure,
            write,
            read,
        };
    let mut roles = vec![role(
        "producer",
        "",
        format!("^{own_queues}$"),
        // Events too: `producer cancel` publishes its control message there.
        format!("^({tasks}|{events}|{own_queues})$"),
        format!("^({events}|{own_queues})$"),
    )];
    let mut worker_roles: Vec<&str> = Vec::new();
    for kind in registry.kinds() {
        if !worker_roles.contains(&kind.role) {
            worker_roles.push(kind.role);
        }
    }
    for name in worker_roles {
        // Both priorities of each kind ([`crate::priority`]).
        let queues: Vec<String> = registry
            .kinds()
            .iter()
            .filter(|k| k.role == name)
            .flat_map(|k| Priority::ALL.map(|p| re(topology.priority_queue(k.name, p))))
            .collect();
        // Besides its work queues, a worker reads the events exchange into its own
        // server-named control queue (cancel requests, see `cancel`).
        let read = format!("^({}|{events}|{own_queues})$", queues.join("|"));
        // A role whose kinds split publishes their parts and joins to the tasks
        // exchange; any other worker cannot publish jobs at all.
        let fans_out = registry
            .kinds()
            .iter()
            .any(|k| k.role == name && k.fans_out);
        let parts = if fans_out {
            format!("{tasks}|")
        } else {
            String::new()
        };
        roles.push(role(
            name,
            "",
            format!("^{own_queues}$"),
            format!("^({parts}{retries}|{dead}|{events}|{own_queues})$"),
            read,
        ));
    }
    // Everything under the prefix: `video_tasks.*` covers the work queues, retry tiers
    // and the parking lot (the dot unescaped, as any character: it also matches
    // `video_tasks` itself).
    let everything = format!("^({tasks}.*|{events}|{own_queues})$");
    roles.push(role(
        "ops",
        "management",
        everything.clone(),
        everything.clone(),
        everything,
    ));
    roles
}

/// The broker definitions (users, vhost `/`, permissions, one policy) the compose stack's
/// broker imports, with `@<role>@` where each user's password hash goes (filled in by
/// `docker/secrets.sh`, which alone sees the passwords).
///
/// The policy keeps the parking lot's messages however often they are looked at. Its
/// quorum queue is declared without `x-delivery-limit` (an argument cannot be added to an
/// existing queue), and on RabbitMQ 4.0–4.2 every return counts towards the delivery
/// limit, which defaults to 20 since 4.0: `dead list` returns each message it shows, and a
/// parked job looked at 20 times would be dropped (it has no dead-letter exchange). The
/// highest limit there is, not `-1`: 4.x reads `-1` as "no limit", 3.x as "dead-letter at
/// the first return". Imported at every broker start, so existing stacks get it too.
pub fn broker_definitions(roles: &[BrokerRole], topology: &Topology) -> serde_json::Value {
    let users: Vec<serde_json::Value> = roles
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.user,
                "password_hash": format!("@{}@", r.role),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": r.tags,
            })
        })
        .collect();
    let permissions: Vec<serde_json::Value> = roles
        .iter()
        .map(|r| {
            serde_json::json!({
                "user": r.user, "vhost": "/",
                "configure": r.configure, "write": r.write, "read": r.read,
            })
        })
        .collect();
    let policies = [serde_json::json!({
        "vhost": "/",
        "name": PARKING_LOT_POLICY,
        "pattern": format!("^{}$", regex_escape(&topology.dead())),
        "apply-to": "queues",
        "priority": 0,
        "definition": { "delivery-limit": i32::MAX },
    })];
    serde_json::json!({
        "users": users, "vhosts": [{ "name": "/" }], "permissions": permissions,
        "policies": policies,
    })
}

/// The name of the parking lot's policy in [`broker_definitions`].
pub const PARKING_LOT_POLICY: &str = "vidpipe-dead-letters-kept";

/// `s` as a regular expression matching exactly `s` (RabbitMQ permissions are regexes).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r".[]\*^$()+?{}|".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn topology(prefix: &str) -> Topology {
        Topology::new(prefix, vec![Duration::from_secs(5)], 20)
    }

    /// The regexes of the scripts before the registry, plus each kind's high-priority
    /// queue, plus what cancel needs: the producer publishes to the events exchange, a
    /// worker declares and binds its own server-named control queue there.
    #[test]
    fn broker_roles_are_the_least_privilege_users() {
        let roles = broker_roles(&Registry::builtin(), &topology(""));
        let row = |r: &BrokerRole| {
            [r.user.as_str(), &r.tags, &r.configure, &r.write, &r.read].map(str::to_owned)
        };
        let rows: Vec<_> = roles.iter().map(row).collect();
        let worker = |user: &str, parts: &str, queue: &str| {
            [
                user,
                "",
                r"^amq\.gen-.*$",
                &format!(
                    r"^({parts}video_tasks\.retry\..*|video_tasks\.dead|video_events|amq\.gen-.*)$"
                ),
                &format!(r"^({queue}|video_events|amq\.gen-.*)$"),
            ]
            .map(str::to_owned)
        };
        let ops = r"^(video_tasks.*|video_events|amq\.gen-.*)$";
        assert_eq!(
            rows,
            [
                [
                    "vidpipe-producer",
                    "",
                    r"^amq\.gen-.*$",
                    r"^(video_tasks|video_events|amq\.gen-.*)$",
                    r"^(video_events|amq\.gen-.*)$",
                ]
                .map(str::to_owned),
                // The transcoder publishes the parts of split jobs; the thumbnailer
                // cannot publish a job at all.
                worker(
                    "vidpipe-transcoder",
                    "video_tasks|",
                    r"video_tasks\.transcode\.high|video_tasks\.transcode"
                ),
                worker(
                    "vidpipe-thumbnailer",
                    "",
                    r"video_tasks\.thumbnail\.high|video_tasks\.thumbnail"
                ),
                ["vidpipe-ops", "management", ops, ops, ops].map(str::to_owned),
            ]
        );
    }

    #[test]
    fn a_prefix_is_matched_literally() {
        let roles = broker_roles(&Registry::builtin(), &topology("t1."));
        assert_eq!(
            roles[1].read,
            r"^(t1\.video_tasks\.transcode\.high|t1\.video_tasks\.transcode|t1\.video_events|amq\.gen-.*)$"
        );
    }

    #[test]
    fn an_added_kind_gets_its_own_role_and_queue() {
        let extra = TaskKind {
            name: "loudness",
            message: "LoudnessJob",
            needs_video: false,
            fans_out: false,
            role: "loudness",
        };
        let registry = Registry::builtin().with(extra).with(extra);
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            ["transcode", "thumbnail", "loudness"]
        );
        let roles = broker_roles(&registry, &topology(""));
        let names: Vec<&str> = roles.iter().map(|r| r.role.as_str()).collect();
        assert_eq!(
            names,
            ["producer", "transcoder", "thumbnailer", "loudness", "ops"]
        );
        assert_eq!(
            roles[3].read,
            r"^(video_tasks\.loudness\.high|video_tasks\.loudness|video_events|amq\.gen-.*)$"
        );
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_cannot_be_registered_twice_differently() {
        let _ = Registry::builtin().with(TaskKind {
            needs_video: false,
            ..TRANSCODE
        });
    }

    #[test]
    fn definitions_leave_a_hash_placeholder_per_role() {
        let defs = broker_definitions(
            &broker_roles(&Registry::builtin(), &topology("")),
            &topology(""),
        );
        let hashes: Vec<&str> = defs["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["password_hash"].as_str().unwrap())
            .collect();
        assert_eq!(
            hashes,
            ["@producer@", "@transcoder@", "@thumbnailer@", "@ops@"]
        );
        assert_eq!(
            defs["permissions"][1]["read"],
            r"^(video_tasks\.transcode\.high|video_tasks\.transcode|video_events|amq\.gen-.*)$"
        );
        // The parking lot keeps what `dead list` looks at (RabbitMQ 4.x counts returns).
        assert_eq!(defs["policies"][0]["pattern"], r"^video_tasks\.dead$");
        assert_eq!(
            defs["policies"][0]["definition"]["delivery-limit"],
            i32::MAX
        );
    }
}
