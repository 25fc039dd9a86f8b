"""Offline checks of rendered Kubernetes manifests (tests/k8s/validate.sh runs this).

    python validate.py RENDERED.yaml --crds DIR --core-out CORE.yaml --settings-rs FILE
                       [--queues Q1,Q2] [--secrets provided|absent]

1. Splits the rendered documents: core kinds go to CORE.yaml, for `kubernetes-validate
   --strict` (run by the caller); every other kind must have a CRD in DIR and is checked
   here against that CRD's served schema with `jsonschema`, strictly: as the API server
   does with strict field validation, an unknown field is an error (a CRD schema allows
   them unless told otherwise, and the server would drop them silently).
2. Checks what vidpipe's deployment promises (docs/operations.md, "Scaling out"): probes,
   grace periods, containment, scratch, resources, secrets referenced and never inlined,
   one ScaledObject per work queue with scale-down slower than the longest job, a
   three-node RabbitmqCluster, egress only to the broker, storage and DNS, a PDB per
   worker, and every VIDPIPE__ variable a known setting.

`python validate.py --compose CONFIG.yaml --settings-rs FILE` checks instead the output of
`docker-compose -f docker-compose.workers.yml config`: workers only, each contained (uid
10001, read-only root, no capabilities, no-new-privileges), S3 storage, a stop grace
above the shutdown grace, and every VIDPIPE__ variable a known setting.

Prints the count of objects per kind. Exit status: 0 all good; 3 a custom kind breaks its
CRD's schema; 4 a policy check failed (3 wins when both); 2 bad input.
"""

import argparse
import copy
import json
import os
import re
import sys
from collections import Counter

import jsonschema
import yaml

# libyaml's parser when PyYAML has it (the CRDs are 1 MB of YAML): 5x faster.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

CORE_GROUPS = {"", "v1", "apps", "batch", "policy", "networking.k8s.io", "autoscaling", "rbac.authorization.k8s.io"}
WORKERS = ("transcoder", "thumbnailer")
ALLOWED_EGRESS_PORTS = {5672, 5671, 443, 9000, 53}
# worker.job_timeout_secs's default (shared/src/settings.rs) when a Deployment leaves it unset.
DEFAULT_JOB_TIMEOUT = 1500.0


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def strict(schema):
    """The schema with `additionalProperties: false` on every object that lists its
    properties and does not keep unknown fields: the API server's strict validation."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def load_crds(directory):
    """(group, version, kind) -> strict schema, for every served version of every CRD."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yaml", ".yml")):
            continue
        with open(os.path.join(directory, name)) as f:
            for doc in yaml.load_all(f, Loader=Loader):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    if v.get("served"):
                        out[(spec["group"], v["name"], spec["names"]["kind"])] = strict(v["schema"]["openAPIV3Schema"])
    return out


def known_settings(settings_rs):
    """The dotted keys of KNOWN_KEYS in shared/src/settings.rs."""
    text = open(settings_rs).read()
    m = re.search(r"pub const KNOWN_KEYS: &\[&str\] = &\[(.*?)\];", text, re.S)
    if not m:
        raise SystemExit(f"validate.py: no KNOWN_KEYS in {settings_rs}")
    return set(re.findall(r'"([a-z0-9_.]+)"', m.group(1)))


class Checker:
    def __init__(self, docs, known_keys, secrets_mode, queues):
        self.docs = docs
        self.known = known_keys
        self.secrets_mode = secrets_mode
        self.queues = queues
        self.errors = []
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def objs(self, kind):
        return self.by_kind.get(kind, {})

    # --- pod templates ------------------------------------------------------------------------
    def pod_templates(self):
        for kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            for name, d in self.objs(kind).items():
                yield f"{kind}/{name}", d, d["spec"]["template"]

    @staticmethod
    def env_map(container):
        return {e["name"]: e for e in container.get("env", [])}

    def check_pod(self, where, tmpl):
        spec = tmpl["spec"]
        psc = spec.get("securityContext", {})
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            self.fail(where, "pod securityContext.seccompProfile.type is not RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            self.fail(where, "automountServiceAccountToken is not false")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            if non_root is not True or uid != 10001:
                self.fail(cw, f"must run as non-root uid 10001 (runAsNonRoot={non_root}, runAsUser={uid})")
            if sc.get("readOnlyRootFilesystem") is not True:
                self.fail(cw, "readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                self.fail(cw, "allowPrivilegeEscalation is not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                self.fail(cw, "capabilities.drop is not [ALL]")
            if sc.get("privileged"):
                self.fail(cw, "privileged")
            res = c.get("resources", {})
            if "memory" not in res.get("requests", {}) or "memory" not in res.get("limits", {}):
                self.fail(cw, "memory request and limit must be set")
            if "cpu" not in res.get("requests", {}):
                self.fail(cw, "cpu request must be set")
            for e in c.get("env", []):
                name = e["name"]
                if name.startswith("VIDPIPE__"):
                    key = ".".join(name[len("VIDPIPE__"):].lower().split("__"))
                    if key not in self.known:
                        self.fail(cw, f"{name} is not a vidpipe setting ({key}); the program would refuse to start")
                secretish = any(w in name for w in ("AMQP__URL", "PASSWORD", "SECRET", "ACCESS_KEY"))
                if secretish and "valueFrom" not in e:
                    self.fail(cw, f"{name} is inlined; a credential must come from a Secret (secretKeyRef)")
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    self.need("ConfigMap", ef["configMapRef"]["name"], cw)

    def need(self, kind, name, where):
        if name not in self.objs(kind):
            self.fail(where, f"refers to {kind} {name}, which the output does not contain")

    # --- workers -------------------------------------------------------------------------------
    def worker_deployment(self, role):
        for name, d in self.objs("Deployment").items():
            labels = d["spec"]["template"]["metadata"].get("labels", {})
            if labels.get("app.kubernetes.io/component") == role:
                return name, d
        return None, None

    def check_worker(self, role):
        name, d = self.worker_deployment(role)
        if d is None:
            self.fail(role, "no Deployment whose pods are labelled app.kubernetes.io/component=" + role)
            return None
        where = f"Deployment/{name}"
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = self.env_map(c)

        def env_value(key, default=None):
            e = env.get(key)
            return e.get("value", default) if e else default

        addr = env_value("VIDPIPE__HEALTH__ADDR")
        if not addr or not re.fullmatch(r"0\.0\.0\.0:\d+", addr):
            self.fail(where, f"VIDPIPE__HEALTH__ADDR must be given explicitly as 0.0.0.0:PORT (is {addr!r})")
            port = None
        else:
            port = int(addr.rsplit(":", 1)[1])
        named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            hg = c.get(probe, {}).get("httpGet")
            if not hg:
                self.fail(where, f"{probe} is not an httpGet")
                continue
            if hg.get("path") != path:
                self.fail(where, f"{probe} path is {hg.get('path')!r}, not {path}")
            p = hg.get("port")
            p = named.get(p, p)
            if port is not None and p != port:
                self.fail(where, f"{probe} port {p} is not the health address's {port}")
        grace = float(env_value("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "60"))
        tgp = spec.get("terminationGracePeriodSeconds", 30)
        if not tgp > grace:
            self.fail(where, f"terminationGracePeriodSeconds {tgp} is not above worker.shutdown_grace_secs {grace:g}")
        scratch = env_value("VIDPIPE__WORKER__SCRATCH_DIR")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        vol = vols.get(mounts.get(scratch)) if scratch else None
        if not vol or "sizeLimit" not in vol.get("emptyDir", {}):
            self.fail(where, f"no emptyDir with a sizeLimit mounted at the scratch dir ({scratch!r})")
        if "cpu" not in c.get("resources", {}).get("limits", {}):
            self.fail(where, "no cpu limit (the worker's threads setting is sized to it)")
        if env.get("VIDPIPE__AMQP__URLS", {}).get("valueFrom", {}).get("secretKeyRef") is None:
            self.fail(where, "VIDPIPE__AMQP__URLS (the broker nodes, for failover) must come from a secretKeyRef")
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not any(self.selects(p["spec"]["selector"], labels) for p in self.objs("PodDisruptionBudget").values()):
            self.fail(where, "no PodDisruptionBudget selects its pods")
        self.check_egress(where, labels)
        return name, float(env_value("VIDPIPE__WORKER__JOB_TIMEOUT_SECS", DEFAULT_JOB_TIMEOUT))

    @staticmethod
    def selects(selector, labels):
        for k, v in selector.get("matchLabels", {}).items():
            if labels.get(k) != v:
                return False
        for e in selector.get("matchExpressions", []):
            has = e["key"] in labels
            val = labels.get(e["key"])
            op = e["operator"]
            if (op == "In" and val not in e["values"]) or (op == "NotIn" and val in e.get("values", [])):
                return False
            if (op == "Exists" and not has) or (op == "DoesNotExist" and has):
                return False
        return True

    def check_egress(self, where, labels):
        pols = [p for p in self.objs("NetworkPolicy").values() if self.selects(p["spec"]["podSelector"], labels)]
        if not any("Egress" in p["spec"].get("policyTypes", []) for p in pols):
            self.fail(where, "no NetworkPolicy restricts its egress")
            return
        broker = False
        for p in pols:
            for rule in p["spec"].get("egress", []):
                ports = {pt.get("port") for pt in rule.get("ports", [])}
                if not rule.get("ports"):
                    self.fail(where, f"NetworkPolicy {p['metadata']['name']} allows egress on every port")
                if ports - ALLOWED_EGRESS_PORTS:
                    self.fail(where, f"NetworkPolicy {p['metadata']['name']} allows egress to ports {sorted(ports - ALLOWED_EGRESS_PORTS)}")
                if {5672, 5671} <= ports and rule.get("to"):
                    broker = True
        if not broker:
            self.fail(where, "no egress rule to the broker's pods on 5672 and 5671")

    # --- KEDA ------------------------------------------------------------------------------------
    def check_scaling(self, worker_timeouts):
        seen = Counter()
        for name, so in self.objs("ScaledObject").items():
            where = f"ScaledObject/{name}"
            spec = so["spec"]
            target = spec["scaleTargetRef"]["name"]
            self.need("Deployment", target, where)
            timeout = worker_timeouts.get(target, DEFAULT_JOB_TIMEOUT)
            for t in spec["triggers"]:
                md = t.get("metadata", {})
                if t["type"] != "rabbitmq" or md.get("mode") != "QueueLength":
                    self.fail(where, "trigger is not rabbitmq with mode QueueLength")
                    continue
                seen[md.get("queueName")] += 1
                auth = t.get("authenticationRef", {}).get("name")
                if not auth:
                    self.fail(where, "trigger has no authenticationRef")
                else:
                    self.need("TriggerAuthentication", auth, where)
                if "host" in md:
                    self.fail(where, "broker host (with its password) given in the trigger, not through the TriggerAuthentication")
            window = (
                spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
                .get("scaleDown", {}).get("stabilizationWindowSeconds")
            )
            if window is None or window <= timeout:
                self.fail(where, f"scale-down stabilizationWindowSeconds {window} is not above the longest job ({timeout:g} s)")
            if spec.get("cooldownPeriod", 300) <= timeout:
                self.fail(where, f"cooldownPeriod {spec.get('cooldownPeriod', 300)} is not above the longest job ({timeout:g} s)")
        for q in self.queues:
            if seen[q] != 1:
                self.fail("KEDA", f"{seen[q]} ScaledObject triggers on work queue {q}, want exactly 1")
        for name, ta in self.objs("TriggerAuthentication").items():
            refs = ta["spec"].get("secretTargetRef", [])
            if not any(r["parameter"] == "host" for r in refs):
                self.fail(f"TriggerAuthentication/{name}", "no `host` from a Secret")

    # --- secrets -----------------------------------------------------------------------------------
    def secret_refs(self):
        """(secret name, key or None, where) for every reference in the output."""
        for where, _, tmpl in self.pod_templates():
            spec = tmpl["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        yield ref["name"], ref["key"], where
                for ef in c.get("envFrom", []):
                    if "secretRef" in ef:
                        yield ef["secretRef"]["name"], None, where
            for v in spec.get("volumes", []):
                if "secret" in v:
                    yield v["secret"]["secretName"], None, where
        for name, ta in self.objs("TriggerAuthentication").items():
            for r in ta["spec"].get("secretTargetRef", []):
                yield r["name"], r["key"], f"TriggerAuthentication/{name}"
        for name, rc in self.objs("RabbitmqCluster").items():
            tmpl = rc["spec"].get("override", {}).get("statefulSet", {}).get("spec", {}).get("template", {})
            for v in tmpl.get("spec", {}).get("volumes", []):
                if "secret" in v:
                    yield v["secret"]["secretName"], None, f"RabbitmqCluster/{name}"

    def check_secrets(self):
        secrets = self.objs("Secret")
        refs = list(self.secret_refs())
        if not refs:
            self.fail("secrets", "nothing refers to a Secret")
        if self.secrets_mode == "absent":
            # A base: its Secrets come from an overlay, so it must not contain any.
            for name in secrets:
                self.fail(f"Secret/{name}", "a base must not contain Secrets (an overlay generates them)")
            return sorted({r[0] for r in refs})
        for name, key, where in refs:
            s = secrets.get(name)
            if s is None:
                self.fail(where, f"refers to Secret {name}, which the output does not contain")
            elif key is not None and key not in (s.get("data") or {}) and key not in (s.get("stringData") or {}):
                self.fail(where, f"refers to key {key} of Secret {name}, which it does not have")
        return sorted({r[0] for r in refs})

    def check_broker(self):
        clusters = self.objs("RabbitmqCluster")
        if len(clusters) != 1:
            self.fail("broker", f"{len(clusters)} RabbitmqClusters, want 1")
        for name, rc in clusters.items():
            if rc["spec"].get("replicas") != 3:
                self.fail(f"RabbitmqCluster/{name}", f"replicas {rc['spec'].get('replicas')}, want 3")

    def run(self):
        for where, _, tmpl in self.pod_templates():
            self.check_pod(where, tmpl)
        for name, cm in self.objs("ConfigMap").items():
            for var in cm.get("data", {}):
                key = ".".join(var[len("VIDPIPE__"):].lower().split("__"))
                if var.startswith("VIDPIPE__") and key not in self.known:
                    self.fail(f"ConfigMap/{name}", f"{var} is not a vidpipe setting ({key})")
        timeouts = {}
        for role in WORKERS:
            r = self.check_worker(role)
            if r:
                timeouts[r[0]] = r[1]
        self.check_scaling(timeouts)
        self.check_broker()
        if not self.objs("Job"):
            self.fail("jobs", "no Job")
        return self.check_secrets()


def seconds(text):
    """Compose durations as `config` prints them: 1m30s, 90s, 2m."""
    total = 0.0
    for n, unit in re.findall(r"([0-9.]+)(h|ms|m|s|us)", str(text)):
        total += float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def check_compose(path, known):
    with open(path) as f:
        cfg = yaml.load(f, Loader=Loader)
    errors = []
    services = cfg.get("services", {})
    if sorted(services) != sorted(WORKERS):
        errors.append(f"services are {sorted(services)}, want only {list(WORKERS)}")
    for name, svc in services.items():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for var in env:
            key = ".".join(var[len("VIDPIPE__"):].lower().split("__"))
            if var.startswith("VIDPIPE__") and key not in known:
                errors.append(f"{name}: {var} is not a vidpipe setting ({key})")
        if str(svc.get("user")) != "10001:10001":
            errors.append(f"{name}: user is {svc.get('user')!r}, not 10001:10001")
        if svc.get("read_only") is not True:
            errors.append(f"{name}: root filesystem is not read-only")
        if svc.get("cap_drop") != ["ALL"]:
            errors.append(f"{name}: cap_drop is not [ALL]")
        if "no-new-privileges:true" not in svc.get("security_opt", []):
            errors.append(f"{name}: no no-new-privileges")
        if env.get("VIDPIPE__STORAGE__BACKEND") != "s3":
            errors.append(f"{name}: storage backend is not s3")
        if not env.get("VIDPIPE__AMQP__URLS"):
            errors.append(f"{name}: no broker URLs (VIDPIPE__AMQP__URLS, the nodes to fail over between)")
        if env.get("VIDPIPE__TOPOLOGY__DECLARE") != "false":
            errors.append(f"{name}: declares the topology (its user may not)")
        grace = float(env.get("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", 60))
        if not seconds(svc.get("stop_grace_period", "10s")) > grace:
            errors.append(f"{name}: stop_grace_period {svc.get('stop_grace_period')} is not above the shutdown grace {grace:g} s")
        if "/readyz" not in " ".join(svc.get("healthcheck", {}).get("test", [])):
            errors.append(f"{name}: healthcheck does not call /readyz")
    for e in errors:
        print(f"FAIL compose: {e}")
    print(f"compose: {len(services)} services ({', '.join(sorted(services))}): {'ok' if not errors else 'FAILED'}")
    return 4 if errors else 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--compose":
        ap = argparse.ArgumentParser()
        ap.add_argument("--compose", required=True)
        ap.add_argument("--settings-rs", required=True)
        args = ap.parse_args()
        return check_compose(args.compose, known_settings(args.settings_rs))
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--crds", required=True)
    ap.add_argument("--core-out", required=True)
    ap.add_argument("--settings-rs", required=True)
    ap.add_argument("--queues", default="video_tasks.transcode,video_tasks.transcode.high,video_tasks.thumbnail,video_tasks.thumbnail.high")
    ap.add_argument("--secrets", choices=["provided", "absent"], required=True)
    args = ap.parse_args()

    with open(args.rendered) as f:
        docs = [d for d in yaml.load_all(f, Loader=Loader) if d]
    if not docs:
        print("validate.py: nothing rendered", file=sys.stderr)
        return 2
    crds = load_crds(args.crds)
    core, status = [], 0
    counts = Counter()
    for d in docs:
        api, kind = d.get("apiVersion", ""), d.get("kind", "")
        counts[kind] += 1
        if group_of(api) in CORE_GROUPS:
            core.append(d)
            continue
        group, _, version = api.partition("/")
        schema = crds.get((group, version, kind))
        name = d.get("metadata", {}).get("name")
        if schema is None:
            print(f"FAIL {kind}/{name}: no CRD in {args.crds} serves {api} {kind}")
            status = 3
            continue
        errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.absolute_path))
        for e in errs:
            path = ".".join(str(p) for p in e.absolute_path) or "(document)"
            print(f"FAIL {kind}/{name} against its CRD ({api}): {path}: {e.message}")
        if errs:
            status = 3
        else:
            print(f"ok   {kind}/{name} against its CRD ({api})")
    with open(args.core_out, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)

    checker = Checker(docs, known_settings(args.settings_rs), args.secrets, [q for q in args.queues.split(",") if q])
    referenced = checker.run()
    for e in checker.errors:
        print(f"FAIL policy: {e}")
    if checker.errors and status == 0:
        status = 4
    print(f"policy: {'ok' if not checker.errors else str(len(checker.errors)) + ' failure(s)'}; "
          f"Secrets referenced: {', '.join(referenced)}"
          + (" (provided by an overlay)" if args.secrets == "absent" else ""))
    print("objects: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + f" ({sum(counts.values())} in all, {len(core)} core)")
    print("COUNTS " + json.dumps(dict(sorted(counts.items()))))
    return status


if __name__ == "__main__":
    sys.exit(main())
