//! `producer tasks`: the task registry ([`shared::tasks`]) for people and for scripts.
//!
//! Shell scripts cannot read Rust, so the broker users of `scripts/rabbitmq-users.sh` and
//! the compose stack's broker definitions (`docker/secrets.sh`) come from here: the
//! registry stays the one place a task kind is declared.

use shared::priority::Priority;
use shared::tasks::{self, Registry};
use shared::topology::Topology;

use crate::cli::TasksArgs;
use crate::say;

/// Prints what `args` asks for on stdout.
pub fn run(args: &TasksArgs) {
    let registry = Registry::builtin();
    // Names only: retry tiers and the delivery limit do not appear in any of the output.
    let topology = Topology::new(&args.prefix, Vec::new(), 0);
    if args.broker_users || args.broker_definitions {
        let roles = tasks::broker_roles(&registry, &topology);
        if args.broker_definitions {
            let defs = tasks::broker_definitions(&roles, &topology);
            say!(
                "{}",
                serde_json::to_string_pretty(&defs).expect("JSON values serialise")
            );
        } else {
            for r in roles {
                say!(
                    "{}\t{}\t{}\t{}\t{}",
                    r.role,
                    r.configure,
                    r.write,
                    r.read,
                    r.tags
                );
            }
        }
    } else if args.json {
        let kinds: Vec<serde_json::Value> = registry
            .kinds()
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": k.name, "routing_key": k.routing_key(),
                    "queue": topology.work_queue(k.name), "message": k.message,
                    "high_routing_key": Priority::High.routing_key(k.routing_key()),
                    "high_queue": topology.priority_queue(k.name, Priority::High),
                    "needs_video": k.needs_video, "role": k.role, "user": k.user(),
                })
            })
            .collect();
        say!("{}", serde_json::Value::Array(kinds));
    } else {
        say!(
            "{:<12} {:<28} {:<14} {:<6} MESSAGE",
            "TASK",
            "QUEUE",
            "ROLE",
            "VIDEO"
        );
        for k in registry.kinds() {
            say!(
                "{:<12} {:<28} {:<14} {:<6} {}",
                k.name,
                topology.work_queue(k.name),
                k.role,
                if k.needs_video { "yes" } else { "no" },
                k.message
            );
        }
    }
}
