#!/usr/bin/env bash
# Offline validation of the deployment files; no cluster and no broker needed (none is
# available on the test machines: the manifests are validated, not applied).
#
#   tests/k8s/validate.sh        (after scripts/setup.sh, which installs the tools)
#
# 1. Renders deploy/kubernetes/base and deploy/kubernetes/overlays/example with `kubectl
#    kustomize` (the overlay in a temporary copy, with its Secrets' files made by its
#    make-secrets.sh when a producer binary is there, else placeholders).
# 2. Validates every core kind with `kubernetes-validate --strict` against Kubernetes
#    $VIDPIPE_K8S_VERSION (default 1.33.0): each must be reported as passed, none skipped.
# 3. Validates every custom kind (ScaledObject, TriggerAuthentication, RabbitmqCluster)
#    against its CRD in ../shared/k8s-crds/ ($VIDPIPE_K8S_CRDS) with `jsonschema`, strict
#    about unknown fields, and checks what the deployment promises (tests/k8s/validate.py).
# 4. Negative checks: broken copies must fail, each at the stage meant to catch it (an
#    unknown field in a Deployment, a wrongly typed and a misspelt field in custom kinds,
#    a grace period below the drain time, scale-down faster than a job, a broker password
#    inlined in a Deployment).
# 5. docker-compose.workers.yml: `docker-compose config` (v1.29; and `docker compose
#    config`, v2, when installed) with docker/workers.env.example, its result checked;
#    without the settings it must be refused.
#
# Tools: $VIDPIPE_K8S_VENV (default ~/.cache/vidpipe-k8s-venv) with kubernetes-validate,
# jsonschema and pyyaml; kubectl; docker-compose. Exit code 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
t0=$(date +%s.%N)
venv=${VIDPIPE_K8S_VENV:-$HOME/.cache/vidpipe-k8s-venv}
crds=${VIDPIPE_K8S_CRDS:-$root/../shared/k8s-crds}
k8s_version=${VIDPIPE_K8S_VERSION:-1.33.0}
py=$venv/bin/python
kv=$venv/bin/kubernetes-validate
settings_rs=$root/shared/src/settings.rs

results=()
failed=0
pass() { results+=("PASS  $1"); echo "k8s: PASS: $1"; }
fail() { results+=("FAIL  $1"); echo "k8s: FAIL: $1"; failed=1; }
summary() {
  echo
  printf '==== deployment validation: %.1f s ====\n' "$(echo "$(date +%s.%N) - $t0" | bc)"
  for r in "${results[@]}"; do echo "  $r"; done
  if [ "$failed" = 0 ] && [ ${#results[@]} -gt 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}
trap summary EXIT

for tool in "$py" "$kv"; do
  [ -x "$tool" ] || { fail "tools: $tool missing (run scripts/setup.sh)"; exit 1; }
done
command -v kubectl >/dev/null || { fail "tools: kubectl missing (run scripts/setup.sh)"; exit 1; }
[ -d "$crds" ] || { fail "tools: no CRDs at $crds (set VIDPIPE_K8S_CRDS)"; exit 1; }
echo "k8s: $(kubectl version --client 2>/dev/null | head -1); $("$kv" --version 2>&1); Kubernetes $k8s_version; CRDs $crds"

tmp=$(mktemp -d /tmp/vidpipe-k8s.XXXXXX)
trap 'rm -rf "$tmp"; summary' EXIT

# The producer binary, when built: the overlay's Secrets come from its make-secrets.sh,
# and the work queues from the task registry.
producer=${VIDPIPE_PRODUCER_BIN:-}
for p in "$root/target/debug/producer" "$root/target/release/producer"; do
  [ -n "$producer" ] || { [ -x "$p" ] && producer=$p; } || true
done
# Both priorities of each kind (shared::priority): each queue needs its KEDA trigger.
queues=video_tasks.transcode,video_tasks.transcode.high,video_tasks.thumbnail,video_tasks.thumbnail.high
if [ -n "$producer" ]; then
  queues=$("$producer" tasks --json | "$py" -c 'import json,sys; print(",".join(q for k in json.load(sys.stdin) for q in (k["queue"], k.get("high_queue")) if q))')
fi

# check NAME DIR SECRETS: renders DIR and runs every stage on it. Sets $stages to the
# stages that failed (render, crd, policy, core), empty when all passed; output in
# $tmp/NAME.log.
check() {
  local name=$1 dir=$2 secrets=$3 out=$tmp/$1 rc=0 core_docs passed
  stages=""
  : >"$out.log"
  if ! kubectl kustomize "$dir" >"$out.yaml" 2>"$out.render.err"; then
    cat "$out.render.err" >>"$out.log"
    stages="render"
    return
  fi
  "$py" tests/k8s/validate.py "$out.yaml" --crds "$crds" --core-out "$out.core.yaml" \
    --settings-rs "$settings_rs" --queues "$queues" --secrets "$secrets" >>"$out.log" 2>&1 || rc=$?
  case $rc in
    0) ;;
    3) stages+=" crd" ;;
    4) stages+=" policy" ;;
    *) stages+=" error" ;;
  esac
  grep -q "^FAIL policy" "$out.log" && [[ $stages != *policy* ]] && stages+=" policy"
  core_docs=$("$py" -c 'import sys,yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$out.core.yaml")
  rc=0
  "$kv" --strict -k "$k8s_version" "$out.core.yaml" >"$out.kv.log" 2>&1 || rc=$?
  cat "$out.kv.log" >>"$out.log"
  passed=$(grep -c " passed for resource " "$out.kv.log" || true)
  # Every core document must be reported as passed: kubernetes-validate only warns about
  # a kind it has no schema for.
  if [ "$rc" != 0 ] || [ "$passed" != "$core_docs" ] || grep -q "^WARN\|^ERROR" "$out.kv.log"; then
    stages+=" core"
  fi
  stages=${stages# }
}

# --- 1-3: the real manifests ------------------------------------------------------------------
cp -r deploy/kubernetes "$tmp/tree"
overlay=$tmp/tree/overlays/example
rm -rf "$overlay/secrets"
if [ -n "$producer" ]; then
  # make-secrets.sh finds docker/secrets.sh two levels above deploy/: give the copy that.
  mkdir -p "$tmp/repo/deploy" && mv "$tmp/tree" "$tmp/repo/deploy/kubernetes" && cp -r docker "$tmp/repo/"
  overlay=$tmp/repo/deploy/kubernetes/overlays/example
  if env VIDPIPE_PRODUCER_BIN="$producer" VIDPIPE_S3_ACCESS_KEY_ID=placeholder-key-id \
    VIDPIPE_S3_SECRET_ACCESS_KEY=placeholder-secret "$overlay/make-secrets.sh" >"$tmp/make-secrets.log" 2>&1 &&
    [ "$(find "$overlay/secrets" -maxdepth 1 -type f -size +0 | wc -l)" = 11 ] &&
    [ "$(tr ',' '\n' <"$overlay/secrets/transcoder.amqp-urls" | grep -c '@vidpipe-rabbitmq-server-[0-2]\.vidpipe-rabbitmq-nodes\.vidpipe\.svc:5672/')" = 3 ]; then
    pass "make-secrets.sh: 11 secret files from docker/secrets.sh and the task registry; amqp-urls lists the 3 broker nodes"
  else
    cat "$tmp/make-secrets.log"
    fail "make-secrets.sh did not write the overlay's 11 secret files, or amqp-urls does not list the 3 broker nodes"
  fi
  tree=$tmp/repo/deploy/kubernetes
else
  echo "k8s: no producer binary (cargo build -p producer): placeholder secret files, queues as written here"
  mkdir -p "$overlay/secrets"
  for r in producer transcoder thumbnailer ops; do
    printf 'amqp://vidpipe-%s:PLACEHOLDER@vidpipe-rabbitmq.vidpipe.svc:5672/%%2f' "$r" >"$overlay/secrets/$r.amqp-url"
    printf 'amqp://vidpipe-%s:PLACEHOLDER@vidpipe-rabbitmq-server-%s.vidpipe-rabbitmq-nodes.vidpipe.svc:5672/%%2f,' "$r" 0 "$r" 1 "$r" 2 |
      sed 's/,$//' >"$overlay/secrets/$r.amqp-urls"
  done
  printf placeholder >"$overlay/secrets/s3-access-key-id"
  printf placeholder >"$overlay/secrets/s3-secret-access-key"
  printf '{"users": [], "vhosts": [{"name": "/"}], "permissions": []}' >"$overlay/secrets/definitions.json"
  tree=$tmp/tree
fi

for target in base:absent overlays/example:provided; do
  dir=${target%%:*}
  check "${dir//\//-}" "$tree/$dir" "${target##*:}"
  log=$tmp/${dir//\//-}.log
  if [ -z "$stages" ]; then
    grep "^objects: " "$log" | sed "s|^|k8s: $dir: |"
    pass "$dir: rendered; $(grep -c ' passed for resource ' "$log") core objects pass kubernetes-validate --strict ($k8s_version); $(grep -c '^ok .* against its CRD' "$log") custom objects pass their CRDs; deployment checks pass"
  else
    cat "$log"
    fail "$dir: failed at: $stages"
  fi
done

# --- 4: negative checks: each broken copy must fail where it should --------------------------
# broken NAME STAGE KIND GROUP VERSION OBJECT JSON-PATCH: an overlay of the base with one
# JSON patch (patchesJson6902: kustomize v2 and v5 both read it).
broken() {
  local name=$1 want=$2 kind=$3 group=$4 version=$5 object=$6 patch=$7 dir=$tree/broken-$1
  mkdir -p "$dir"
  printf '%s\n' "$patch" >"$dir/patch.yaml"
  cat >"$dir/kustomization.yaml" <<EOF
bases:
  - ../base
patchesJson6902:
  - target: {group: "$group", version: $version, kind: $kind, name: $object}
    path: patch.yaml
EOF
  check "broken-$name" "$dir" absent
  if [ "$stages" = "$want" ]; then
    pass "negative: $name: rejected at the $want stage"
  else
    cat "$tmp/broken-$name.log"
    fail "negative: $name: not rejected at the $want stage (failed at: '${stages:-nothing}')"
  fi
}
broken unknown-field-in-deployment core Deployment apps v1 vidpipe-transcoder \
  '- {op: add, path: /spec/template/spec/containers/0/readinessProbe/httpGet/pathh, value: /readyz}'
broken wrong-type-in-scaledobject crd ScaledObject keda.sh v1alpha1 vidpipe-thumbnailer \
  '- {op: replace, path: /spec/pollingInterval, value: often}'
broken misspelt-field-in-rabbitmqcluster crd RabbitmqCluster rabbitmq.com v1beta1 vidpipe-rabbitmq \
  '- {op: add, path: /spec/replica, value: 3}'
broken grace-below-drain policy Deployment apps v1 vidpipe-thumbnailer \
  '- {op: replace, path: /spec/template/spec/terminationGracePeriodSeconds, value: 30}'
broken scale-down-faster-than-a-job policy ScaledObject keda.sh v1alpha1 vidpipe-transcoder \
  '- {op: replace, path: /spec/advanced/horizontalPodAutoscalerConfig/behavior/scaleDown/stabilizationWindowSeconds, value: 300}'
broken inlined-broker-password policy Deployment apps v1 vidpipe-transcoder \
  '- {op: replace, path: /spec/template/spec/containers/0/env/0, value: {name: VIDPIPE__AMQP__URLS, value: "amqp://vidpipe-transcoder:hunter2@vidpipe-rabbitmq:5672/%2f"}}'

# --- 5: the compose file for workers on other machines ---------------------------------------
compose_cmds=()
command -v docker-compose >/dev/null && compose_cmds+=("docker-compose")
docker compose version >/dev/null 2>&1 && compose_cmds+=("docker compose")
[ ${#compose_cmds[@]} -gt 0 ] || fail "compose: neither docker-compose nor docker compose is installed (scripts/setup.sh)"
for cmd in "${compose_cmds[@]}"; do
  read -r -a c <<<"$cmd"
  # A clean environment: the file's own variables come from the example settings only.
  if env -i PATH="$PATH" HOME="$HOME" "${c[@]}" -f docker-compose.workers.yml --project-directory "$root" \
    --env-file docker/workers.env.example config >"$tmp/workers.yaml" 2>"$tmp/workers.err" &&
    "$py" tests/k8s/validate.py --compose "$tmp/workers.yaml" --settings-rs "$settings_rs" >"$tmp/workers.log" 2>&1; then
    pass "compose: \`$cmd -f docker-compose.workers.yml config\` with docker/workers.env.example: $(tail -1 "$tmp/workers.log")"
  else
    cat "$tmp/workers.err" "$tmp/workers.log" 2>/dev/null || true
    fail "compose: \`$cmd -f docker-compose.workers.yml config\` failed"
  fi
  # Without its settings the file must be refused (no silent defaults for the broker or S3).
  if env -i PATH="$PATH" HOME="$HOME" "${c[@]}" -f docker-compose.workers.yml --project-directory "$tmp" \
    config -q >/dev/null 2>"$tmp/workers-unset.err"; then
    fail "negative: compose: \`$cmd config\` accepted docker-compose.workers.yml with no settings"
  else
    pass "negative: compose: \`$cmd config\` refuses it with no settings ($(grep -o 'set VIDPIPE_[A-Z0-9_]*' "$tmp/workers-unset.err" | head -1))"
  fi
done

[ "$failed" = 0 ]
