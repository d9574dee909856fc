#!/usr/bin/env python3
"""Renders a kustomization directory to multi-document YAML on stdout, for checks on
machines without the kustomize binary (scripts/check-deploy.sh).

Only the subset k8s/ uses is implemented, and anything else is refused rather than
silently ignored:
  resources   files (one or more documents) and directories with a kustomization
  namespace   set on every namespaced object
  images      name -> newName / newTag / digest, for containers and initContainers
  patches     strategic merge patches (path: or patch:), matched by kind and name,
              with the list merge keys of the Kubernetes types used here

Usage: render.py DIR [--out FILE]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
# Strategic merge: lists of objects merged by this key (k8s `patchMergeKey`); any
# other list is replaced whole, as the API server does for lists without one.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


class RenderError(Exception):
    pass


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def strategic_merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if isinstance(k, str) and k.startswith("$"):
                raise RenderError(f"patch directive {k} is not supported by render.py")
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # Items of the patch merge into the item with the same key; new ones come
        # first, in patch order (as kustomize writes them).
        mk = MERGE_KEYS[key]
        out = [copy.deepcopy(x) for x in base]
        added = []
        for item in patch:
            if not isinstance(item, dict) or mk not in item:
                raise RenderError(f"list {key}: every patch item needs {mk}")
            for i, existing in enumerate(out):
                if isinstance(existing, dict) and existing.get(mk) == item[mk]:
                    out[i] = strategic_merge(existing, item)
                    break
            else:
                added.append(copy.deepcopy(item))
        return added + out
    return copy.deepcopy(patch)


def set_image(image: str, rules: list[dict]) -> str:
    name, tag, digest = image, None, None
    if "@" in name:
        name, digest = name.split("@", 1)
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    for rule in rules:
        if rule.get("name") != name:
            continue
        unknown = set(rule) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"images: unsupported fields {sorted(unknown)}")
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            tag, digest = str(rule["newTag"]), None
        break
    if digest:
        return f"{name}@{digest}"
    return f"{name}:{tag}" if tag else name


def pod_specs(obj: dict):
    spec = obj.get("spec") or {}
    if obj["kind"] == "Pod":
        yield spec
    elif obj["kind"] == "CronJob":
        yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif "template" in spec:
        yield spec["template"].get("spec", {})


def render(directory: Path) -> list[dict]:
    kfile = find_kustomization(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{kfile}: fields not supported by render.py: {sorted(unknown)}")
    objects: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(load_docs(path))
        else:
            raise RenderError(f"{kfile}: resource {entry} not found")

    for p in k.get("patches", []):
        if "target" in p or "options" in p:
            raise RenderError(f"{kfile}: patch target/options are not supported by render.py")
        if "path" in p:
            patch_docs = load_docs(directory / p["path"])
        else:
            patch_docs = [d for d in yaml.safe_load_all(p["patch"]) if d]
        for patch in patch_docs:
            if isinstance(patch, list):
                raise RenderError(f"{kfile}: JSON 6902 patches are not supported by render.py")
            kind, name = patch["kind"], patch["metadata"]["name"]
            matches = [
                i for i, o in enumerate(objects)
                if o["kind"] == kind and o["metadata"]["name"] == name
            ]
            if len(matches) != 1:
                raise RenderError(f"{kfile}: patch for {kind}/{name} matches {len(matches)} objects")
            i = matches[0]
            objects[i] = strategic_merge(objects[i], patch)

    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]

    if "images" in k:
        for o in objects:
            for spec in pod_specs(o):
                for key in ("initContainers", "containers"):
                    for c in spec.get(key, []):
                        c["image"] = set_image(c["image"], k["images"])
    return objects


def main(argv: list[str]) -> int:
    args = argv[1:]
    out = None
    if "--out" in args:
        i = args.index("--out")
        out = args[i + 1]
        del args[i : i + 2]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objects = render(Path(args[0]))
    except (RenderError, OSError, yaml.YAMLError, KeyError) as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 1
    text = yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
