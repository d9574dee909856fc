#!/usr/bin/env python3
"""Keeps the images, the Kubernetes manifests and docker/layout.env in step.

  layout.py check RENDERED.yaml...     the Dockerfiles' ARG defaults, ENTRYPOINT,
                                       HEALTHCHECK, USER, WORKDIR, EXPOSE, COPY targets
                                       and ENV against docker/layout.env; the rendered
                                       manifests' user, port, probes, ConfigMap keys,
                                       Service/ServiceMonitor/HPA/PDB wiring against
                                       layout.env and src/ (LADIC_* names in
                                       src/config.rs, routes in src/http/mod.rs, metric
                                       names in src/metrics.rs); metric names quoted in
                                       docs/deploy.md against src/metrics.rs
  layout.py image-env DOCKERFILE ROOT  the runtime stage's ENV as KEY=VALUE lines, with
                                       absolute paths moved under ROOT
  layout.py pod-env RENDERED.yaml      the env a pod of the Deployment gets from its
                                       ConfigMap and literal `env` values, KEY=VALUE lines

Run from anywhere; paths are taken relative to the repository root. Exit 1 with one
line per problem when a check fails.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ROOT / "docker" / "layout.env"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]


# --- sources of truth -------------------------------------------------------------------

def read_layout() -> dict[str, str]:
    out = {}
    for n, line in enumerate(LAYOUT.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([^\s'\"$]+)", line)
        if not m:
            raise SystemExit(f"{LAYOUT}:{n}: expected KEY=value without quotes or $: {line}")
        out[m.group(1)] = m.group(2)
    return out


def ladic_env_names() -> set[str]:
    text = (ROOT / "src" / "config.rs").read_text()
    names = set(re.findall(r'env\s*=\s*"(LADIC_[A-Z0-9_]+)"', text))
    if not names:
        raise SystemExit("src/config.rs: found no LADIC_* env names (has the CLI moved?)")
    return names


def get_routes() -> set[str]:
    text = (ROOT / "src" / "http" / "mod.rs").read_text()
    routes = set(re.findall(r'\(\s*"GET"\s*,\s*"(/[^"]*)"\s*\)', text))
    if not routes:
        raise SystemExit("src/http/mod.rs: found no GET routes in ROUTES")
    return routes


def metric_families() -> set[str]:
    text = (ROOT / "src" / "metrics.rs").read_text()
    m = re.search(r'const PREFIX: &str = "([a-z_]+)"', text)
    prefix = m.group(1) + "_" if m else ""
    names = re.findall(r'(?:Opts|Gauge|Counter|Histogram)[A-Za-z]*::(?:new|with_opts)\(\s*"([a-z_:]+)"', text)
    if not names:
        raise SystemExit("src/metrics.rs: found no metric names")
    return {prefix + n for n in names}


# --- Dockerfile parsing -------------------------------------------------------------------

class Instruction:
    def __init__(self, cmd: str, args: str, line: int):
        self.cmd, self.args, self.line = cmd.upper(), args.strip(), line


def parse_dockerfile(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            cmd, _, args = buf.strip().partition(" ")
            out.append(Instruction(cmd, args, start))
        buf = ""
    return out


VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, scope: dict[str, str], missing: set[str]) -> str:
    def repl(m):
        name = m.group(1) or m.group(3)
        if name in scope:
            return scope[name]
        if m.group(2) is not None:
            return m.group(2)
        missing.add(name)
        return ""
    return VAR.sub(repl, text)


def split_pairs(args: str) -> list[tuple[str, str | None]]:
    """ARG/ENV operands: KEY=VALUE pairs (shell-quoted values), or a bare KEY."""
    out = []
    for tok in shlex.split(args, posix=True):
        key, eq, value = tok.partition("=")
        out.append((key, value if eq else None))
    return out


class Stage:
    def __init__(self, base: str, name: str | None):
        self.base, self.name = base, name
        self.instructions: list[Instruction] = []


class Dockerfile:
    """Global ARG defaults, and the stages with their instructions."""

    def __init__(self, path: Path):
        self.path = path
        self.global_args: dict[str, str | None] = {}
        self.arg_defaults: list[tuple[str, str, int]] = []  # every ARG KEY=default
        self.stages: list[Stage] = []
        for ins in parse_dockerfile(path):
            if ins.cmd == "FROM":
                parts = ins.args.split()
                parts = [p for p in parts if not p.startswith("--")]
                name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
                self.stages.append(Stage(parts[0], name))
                continue
            if ins.cmd == "ARG":
                for key, value in split_pairs(ins.args):
                    if value is not None:
                        self.arg_defaults.append((key, value, ins.line))
                    if not self.stages:
                        self.global_args[key] = value
            if self.stages:
                self.stages[-1].instructions.append(ins)

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def evaluate(self, stage: Stage, base_env: dict[str, str] | None = None):
        """Walks a stage the way the builder does: the scope of each instruction (its
        ARGs and the ENV set so far), the resolved operands, and undefined names."""
        args: dict[str, str] = {}
        env: dict[str, str] = dict(base_env or {})
        resolved: list[tuple[Instruction, str]] = []
        missing: set[str] = set()
        for ins in stage.instructions:
            scope = {**args, **env}
            if ins.cmd == "ARG":
                for key, value in split_pairs(ins.args):
                    if value is None:
                        value = self.global_args.get(key)
                    if value is None:
                        missing.add(key)
                    args[key] = substitute(value or "", scope, missing)
                resolved.append((ins, ins.args))
            elif ins.cmd == "ENV":
                pairs = split_pairs(ins.args)
                if len(pairs) >= 1 and pairs[0][1] is None:  # legacy ENV KEY VALUE
                    key, _, value = ins.args.partition(" ")
                    pairs = [(key, value.strip())]
                for key, value in pairs:
                    env[key] = substitute(value or "", scope, missing)
                resolved.append((ins, ins.args))
            elif ins.cmd in ("COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "STOPSIGNAL", "LABEL", "VOLUME"):
                resolved.append((ins, substitute(ins.args, scope, missing)))
            else:
                resolved.append((ins, ins.args))
        return env, resolved, missing


# --- checks -------------------------------------------------------------------------------

class Problems(list):
    def add(self, where: str, msg: str):
        self.append(f"{where}: {msg}")


def check_dockerfile(path: Path, layout: dict[str, str], env_names: set[str], p: Problems):
    rel = path.relative_to(ROOT)
    df = Dockerfile(path)
    seen = set()
    for key, value, line in df.arg_defaults:
        if key in layout:
            seen.add(key)
            if value != layout[key]:
                p.add(f"{rel}:{line}", f"ARG {key}={value}, but docker/layout.env has {key}={layout[key]}")
    for key in sorted(set(layout) - seen):
        p.add(str(rel), f"no ARG {key}=... default (docker/layout.env defines it)")
    if not df.stages:
        p.add(str(rel), "no FROM")
        return
    stage = df.runtime
    declared = {k for i in stage.instructions if i.cmd == "ARG" for k, _ in split_pairs(i.args)}
    for key in sorted(set(layout) - declared):
        p.add(str(rel), f"the runtime stage does not declare ARG {key} (it would expand empty there)")
    env, resolved, missing = df.evaluate(stage, base_env={"LD_LIBRARY_PATH": "", "PATH": ""})
    for name in sorted(missing):
        p.add(str(rel), f"runtime stage uses ${{{name}}}, which is not defined there")

    def operands(cmd):
        return [(i, r) for i, r in resolved if i.cmd == cmd]

    def last(cmd):
        found = operands(cmd)
        return found[-1][1] if found else None

    user = last("USER")
    if user != f"{layout['APP_UID']}:{layout['APP_GID']}":
        p.add(str(rel), f"USER is {user!r}, expected {layout['APP_UID']}:{layout['APP_GID']} (numeric)")
    workdir = last("WORKDIR")
    if workdir != layout["APP_DIR"]:
        p.add(str(rel), f"WORKDIR is {workdir!r}, expected {layout['APP_DIR']}")
    expose = last("EXPOSE")
    if expose is None or expose.split("/")[0] != layout["PORT"]:
        p.add(str(rel), f"EXPOSE is {expose!r}, expected {layout['PORT']}")
    signal = last("STOPSIGNAL")
    if signal != "SIGTERM":
        p.add(str(rel), f"STOPSIGNAL is {signal!r}, expected SIGTERM")

    entry = last("ENTRYPOINT")
    try:
        entry_argv = json.loads(entry) if entry else None
    except json.JSONDecodeError:
        entry_argv = None
    if not entry_argv or entry_argv[0] != layout["BIN_PATH"]:
        p.add(str(rel), f"ENTRYPOINT must be exec form starting with {layout['BIN_PATH']}: {entry!r}")
    health = last("HEALTHCHECK")
    hc = re.search(r"\bCMD\s+(\[.*\])\s*$", health or "")
    hc_argv = json.loads(hc.group(1)) if hc else None
    if not hc_argv or hc_argv[0] != layout["HEALTHCHECK_PATH"]:
        p.add(str(rel), f"HEALTHCHECK must be CMD [\"{layout['HEALTHCHECK_PATH']}\", ...]: {health!r}")
    elif len(hc_argv) > 1 and hc_argv[1] not in get_routes():
        p.add(str(rel), f"HEALTHCHECK probes {hc_argv[1]}, not a GET route of src/http/mod.rs")

    copies = []
    for i, r in operands("COPY"):
        toks = [t for t in shlex.split(r) if not t.startswith("--")]
        copies.append((toks[:-1], toks[-1]))
    dests = {d.rstrip("/") for _, d in copies}
    for key in ("BIN_PATH", "HEALTHCHECK_PATH", "ORT_LIB_DIR", "BUNDLE_DIR"):
        if layout[key] not in dests:
            p.add(str(rel), f"nothing is copied to {key}={layout[key]} in the runtime stage")
    if not any(d.rstrip("/") == layout["BUNDLE_DIR"] and [s.rstrip("/") for s in srcs] == [layout["BUNDLE_SRC"]]
               for srcs, d in copies):
        p.add(str(rel), f"the bundle is not copied from {layout['BUNDLE_SRC']} to {layout['BUNDLE_DIR']}")

    expect = {
        "ORT_DYLIB_PATH": layout["ORT_LIB_DIR"] + "/libonnxruntime.so",
        "LADIC_BUNDLE": layout["BUNDLE_DIR"],
        "LADIC_BIND": "0.0.0.0:" + layout["PORT"],
    }
    for key, value in expect.items():
        if env.get(key) != value:
            p.add(str(rel), f"ENV {key}={env.get(key)!r}, expected {value}")
    for key in env:
        if key.startswith("LADIC_") and key not in env_names:
            p.add(str(rel), f"ENV {key} is not a LADIC_* variable of src/config.rs")


def load_objects(path: Path) -> list[dict]:
    import yaml
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(objects, kind, rel, p) -> dict | None:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        p.add(rel, f"expected one {kind}, found {len(found)}")
        return None
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_manifests(path: Path, layout: dict[str, str], env_names: set[str], p: Problems):
    rel = str(path)
    objs = load_objects(path)
    routes = get_routes()
    metrics = metric_families()
    dep = one(objs, "Deployment", rel, p)
    if dep is None:
        return
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    pod_labels = pod["metadata"].get("labels", {})
    if not matches(dep["spec"]["selector"].get("matchLabels"), pod_labels):
        p.add(rel, "the Deployment's selector does not match its pod labels")
    psc = spec.get("securityContext", {})
    if str(psc.get("runAsUser")) != layout["APP_UID"] or str(psc.get("runAsGroup")) != layout["APP_GID"]:
        p.add(rel, f"pod runAsUser/runAsGroup {psc.get('runAsUser')}/{psc.get('runAsGroup')}, "
                   f"expected {layout['APP_UID']}/{layout['APP_GID']} (docker/layout.env)")
    if psc.get("runAsNonRoot") is not True:
        p.add(rel, "pod securityContext.runAsNonRoot must be true")
    if spec.get("automountServiceAccountToken") is not False:
        p.add(rel, "automountServiceAccountToken must be false")
    containers = spec.get("containers", [])
    if len(containers) != 1:
        p.add(rel, f"expected one container, found {len(containers)}")
        return
    c = containers[0]
    csc = c.get("securityContext", {})
    for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
        if csc.get(key) is not want:
            p.add(rel, f"container securityContext.{key} must be {want}")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        p.add(rel, "container must drop ALL capabilities")
    for key in ("runAsUser", "runAsGroup"):
        if key in csc and str(csc[key]) != layout["APP_UID" if key == "runAsUser" else "APP_GID"]:
            p.add(rel, f"container {key} {csc[key]} differs from docker/layout.env")
    if not any(m.get("mountPath") == "/tmp" for m in c.get("volumeMounts", [])):
        p.add(rel, "no writable /tmp (emptyDir) under the read-only root file system")
    ports = {pt.get("name"): pt for pt in c.get("ports", [])}
    if [pt.get("containerPort") for pt in c.get("ports", [])] != [int(layout["PORT"])]:
        p.add(rel, f"containerPort must be {layout['PORT']} (docker/layout.env)")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet")
        if not get:
            p.add(rel, f"no {probe} httpGet")
            continue
        if get.get("path") not in routes:
            p.add(rel, f"{probe} path {get.get('path')} is not a GET route of src/http/mod.rs")
        if get.get("port") not in ports and get.get("port") != int(layout["PORT"]):
            p.add(rel, f"{probe} port {get.get('port')} is not the container's port")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health/live":
        p.add(rel, "livenessProbe must probe /health/live (readiness turns false on drain)")

    # The env a pod gets, and the drain budget.
    env = pod_env(objs, rel, p)
    for key in env:
        if key.startswith("LADIC_") and key not in env_names:
            p.add(rel, f"{key} is not a LADIC_* variable of src/config.rs")
    grace = int(env.get("LADIC_SHUTDOWN_GRACE_SECONDS", "30"))
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = int(pre.get("sleep", {}).get("seconds", 0)) if "sleep" in pre else 0
    if "exec" in pre:
        argv = pre["exec"].get("command", [])
        sleep = int(argv[-1]) if argv and argv[-1].isdigit() else 0
    if not pre:
        p.add(rel, "no preStop hook (endpoints need time to drop the pod before SIGTERM)")
    tgps = int(spec.get("terminationGracePeriodSeconds", 30))
    # The service waits up to the grace for in-flight requests, answers those still
    # waiting 503, then waits up to 5 s in all for connections to close and its workers
    # to stop (src/server.rs, CLOSE_TIMEOUT).
    need = sleep + grace + 5
    if tgps <= need:
        p.add(rel, f"terminationGracePeriodSeconds {tgps} must exceed preStop {sleep} s + "
                   f"LADIC_SHUTDOWN_GRACE_SECONDS {grace} s + 5 s close")

    svc = one(objs, "Service", rel, p)
    if svc:
        if not matches(svc["spec"].get("selector"), pod_labels):
            p.add(rel, "the Service's selector does not match the pod labels")
        for sp in svc["spec"].get("ports", []):
            tp = sp.get("targetPort", sp.get("port"))
            if tp not in ports and tp != int(layout["PORT"]):
                p.add(rel, f"Service targetPort {tp} is not the container's port")
    sm = one(objs, "ServiceMonitor", rel, p)
    if sm and svc:
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            p.add(rel, f"ServiceMonitor apiVersion {sm.get('apiVersion')}")
        if not matches(sm["spec"].get("selector", {}).get("matchLabels"), svc["metadata"].get("labels", {})):
            p.add(rel, "the ServiceMonitor's selector does not match the Service's labels")
        names = {sp.get("name") for sp in svc["spec"].get("ports", [])}
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in names:
                p.add(rel, f"ServiceMonitor endpoint port {ep.get('port')} is not a named Service port")
            if ep.get("path", "/metrics") not in routes:
                p.add(rel, f"ServiceMonitor path {ep.get('path')} is not a GET route")
    hpa = one(objs, "HorizontalPodAutoscaler", rel, p)
    if hpa:
        ref = hpa["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
            p.add(rel, "the HPA does not target the Deployment")
        for m in hpa["spec"].get("metrics", []):
            if m["type"] in ("Pods", "Object", "External"):
                name = m[m["type"].lower()]["metric"]["name"]
                if name not in metrics:
                    p.add(rel, f"HPA metric {name} is not a metric of src/metrics.rs")
        if hpa["spec"].get("minReplicas", 1) < 2:
            p.add(rel, "HPA minReplicas < 2: the PodDisruptionBudget would block node drains or allow downtime")
        if "replicas" in dep["spec"]:
            p.add(rel, "the Deployment sets replicas although an HPA owns the count")
    pdb = one(objs, "PodDisruptionBudget", rel, p)
    if pdb and not matches(pdb["spec"].get("selector", {}).get("matchLabels"), pod_labels):
        p.add(rel, "the PodDisruptionBudget's selector does not match the pod labels")


def pod_env(objs, rel="", p=None) -> dict[str, str]:
    dep = next(o for o in objs if o.get("kind") == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        if not ref:
            continue
        cms = [o for o in objs if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == ref["name"]]
        if not cms:
            if p is not None and not ref.get("optional"):
                p.add(rel, f"envFrom ConfigMap {ref['name']} is not in the manifests")
            continue
        for k, v in (cms[0].get("data") or {}).items():
            if not isinstance(v, str):
                if p is not None:
                    p.add(rel, f"ConfigMap value of {k} must be a string (quote it)")
                v = str(v)
            env[k] = v
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
    return env


def check_docs(layout, p: Problems):
    doc = ROOT / "docs" / "deploy.md"
    if not doc.exists():
        p.add("docs/deploy.md", "missing")
        return
    families = metric_families()
    # Metric names, not Rust paths such as the access log's target `ladic_serve::access`.
    for name in sorted(set(re.findall(r"\bladic_[a-z_]+\b(?!::)", doc.read_text()))):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in families and base not in families:
            p.add("docs/deploy.md", f"{name} is not a metric of src/metrics.rs")


def reroot(value: str, root: str) -> str:
    parts = value.split(":")
    if not any(x.startswith("/") for x in parts):
        return value
    return ":".join(root + x if x.startswith("/") else x for x in parts if x)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[1], argv[2:]
    layout = read_layout()
    if cmd == "check":
        env_names = ladic_env_names()
        problems = Problems()
        for df in DOCKERFILES:
            check_dockerfile(df, layout, env_names, problems)
        for path in rest:
            check_manifests(Path(path), layout, env_names, problems)
        check_docs(layout, problems)
        for line in problems:
            print(f"layout: {line}", file=sys.stderr)
        if problems:
            return 1
        print(f"layout: {len(DOCKERFILES)} Dockerfiles and {len(rest)} rendered manifests agree "
              f"with docker/layout.env and src/")
        return 0
    if cmd == "image-env" and len(rest) == 2:
        df = Dockerfile(Path(rest[0]))
        # The base image's own search path may be extended (CUDA image); not here.
        env, resolved, missing = df.evaluate(df.runtime, base_env={"LD_LIBRARY_PATH": ""})
        if missing:
            print(f"layout: undefined in the runtime stage: {sorted(missing)}", file=sys.stderr)
            return 1
        own = {k for i, _ in resolved if i.cmd == "ENV" for k, _ in split_pairs(i.args)}
        for k, v in env.items():
            if k in own:
                print(f"{k}={reroot(v, rest[1].rstrip('/'))}")
        return 0
    if cmd == "pod-env" and len(rest) == 1:
        for k, v in pod_env(load_objects(Path(rest[0]))).items():
            print(f"{k}={v}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
