#!/usr/bin/env python3
"""Writes RabbitMQ definitions (users, vhost, permissions) for vidpipe to stdout.

    docker/rabbitmq/make-definitions.py > docker/rabbitmq/definitions.json

Passwords come from VIDPIPE_PRODUCER_PASSWORD, VIDPIPE_TRANSCODER_PASSWORD,
VIDPIPE_THUMBNAILER_PASSWORD and VIDPIPE_OPS_PASSWORD; unset ones get the development
defaults that docker-compose.yml uses ("<role>-dev-password"). Change them for anything
but a laptop, and give the new ones to the services (VIDPIPE_*_AMQP_URL, see
docs/operations.md). Only salted SHA-256 hashes are written.

The permissions are those of scripts/rabbitmq-users.sh (no topology prefix): no user may
configure the work topology except vidpipe-ops, which declares it once
(`transcoder --declare-topology`, the compose service `topology`).
"""
import base64
import hashlib
import json
import os
import sys

GEN = r"amq\.gen-.*"
TOPOLOGY = r"^(video_tasks.*|video_events|amq\.gen-.*)$"


def password_hash(password: str) -> str:
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def password(role: str) -> str:
    return os.environ.get(f"VIDPIPE_{role.upper()}_PASSWORD") or f"{role}-dev-password"


def worker(task: str):
    return {
        "configure": "^$",
        "write": r"^(video_tasks\.retry\..*|video_tasks\.dead|video_events)$",
        "read": rf"^video_tasks\.{task}$",
    }


users = {
    # Publishes jobs to video_tasks; follows video_events through its own server-named
    # exclusive queues (upload --wait).
    "producer": ("", {"configure": f"^{GEN}$", "write": rf"^(video_tasks|{GEN})$", "read": rf"^(video_events|{GEN})$"}),
    # Consume their own work queue; publish retries, dead letters and events.
    "transcoder": ("", worker("transcode")),
    "thumbnailer": ("", worker("thumbnail")),
    # Declares the topology, administers dead letters (producer dead …), management UI.
    "ops": ("management", {"configure": TOPOLOGY, "write": TOPOLOGY, "read": TOPOLOGY}),
}

definitions = {
    "users": [
        {
            "name": f"vidpipe-{role}",
            "password_hash": password_hash(password(role)),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": tags,
        }
        for role, (tags, _) in users.items()
    ],
    "vhosts": [{"name": "/"}],
    "permissions": [
        {"user": f"vidpipe-{role}", "vhost": "/", **perms} for role, (_, perms) in users.items()
    ],
}
json.dump(definitions, sys.stdout, indent=2)
sys.stdout.write("\n")
