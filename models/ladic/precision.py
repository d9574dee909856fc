"""fp16 bundles: the three graphs with fp16 weights and compute, same inputs and outputs.

    python -m ladic.precision convert --bundle scenes-tiny --out /tmp/st-fp16 [--precision mixed]
    python -m ladic.precision compare --fp32 scenes-tiny --fp16 /tmp/st-fp16 \\
        --split test-seen --limit 200

(`python -m ladic.export ... --precision fp16|mixed` exports fp32 and converts in place.)

The conversion keeps every graph input and output exactly as the manifest says
(float32 / int64): a Cast to fp16 follows each float input and a Cast to fp32 precedes
each float output, so a reader of the bundle needs no change. The one exception is
`--kv-precision fp16` (`convert_model`'s `fp16_io`): the encoder's `image_kv` output
and the denoiser's `image_kv` input become float16, and the manifest says so (a reader
must then handle float16 K/V; docs/bundle.md). Two precisions:

- "fp16": every float tensor, initializer and constant becomes fp16, except the nodes
  in `KEEP_FP32_OPS` (ArgMax/ReduceMax and the like) and a Softmax whose results only
  feed such nodes: the decoder's last Softmax, ArgMax and ReduceMax stay fp32, so token
  ids and confidences (which Back&Refine ranks, ties to the lower position) are not
  decided on fp16-rounded probabilities. LayerNormalization and the attention Softmax
  run in fp16 (ONNX Runtime's CUDA kernels accumulate them in fp32). Fewest casts.
- "mixed": only MatMul/Gemm/Conv run in fp16 (fp16 weights, activations cast to fp16
  before and back to fp32 after), as torch.autocast does; additions, LayerNorm,
  Softmax, GELU, biases and embedding tables stay fp32. More casts, closer to fp32.

`compare` captions the first N images of a Scenes split with both bundles, the same
seeded noise and the default sampler parameters, and fails when fewer than
`--min-agreement` of the captions have exactly the same decoder token ids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .config import LadicConfig
from .sampler import (
    OnnxBackend,
    SampleParams,
    SeededNoise,
    TextIds,
    caption_images,
    clean_ids,
    refuse_unconditional_half,
)

# What a bundle's manifest says in "precision"; the graphs' inputs and outputs are the
# same in all three.
PRECISIONS = ("fp32", "fp16", "mixed")
GRAPHS = ("encoder", "denoiser", "decoder")
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# "mixed" runs only these in fp16 (as torch.autocast would): matrix products with fp16
# weights; additions, norms, softmax, GELU, biases and embedding tables stay fp32.
MIXED_FP16_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
# Ops kept in fp32: selections over a vector (a tie made by fp16 rounding picks another
# id or position).
KEEP_FP32_OPS = frozenset({"ArgMax", "ArgMin", "ReduceMax", "ReduceMin", "TopK"})
# Ops that only move or select data: they stay fp32 when they read an fp32 graph input
# (directly or through others of them), so that the input is cast after them, on what
# they select. The denoiser gathers each row's K/V for each layer from the `image_kv`
# pool (and, exported --unconditional-half, slices slot 0's): cast first, the whole pool
# (every slot) would be read and converted per call.
DATA_MOVEMENT_OPS = frozenset({"Reshape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Flatten"})
# A node of these types stays fp32 too when every consumer of its outputs does.
FOLLOW_FP32_OPS = frozenset({"Softmax", "LogSoftmax"})
# Ops whose float inputs or outputs are not all of one type (or that hold subgraphs):
# none is in the LaDiC graphs; refuse rather than write a wrong graph.
UNSUPPORTED_OPS = frozenset({
    "Resize", "Upsample", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
    "RandomUniformLike", "Bernoulli", "Multinomial", "If", "Loop", "Scan",
})

# Thresholds of the fp16 vs fp32 graph check on random inputs (export and convert). It
# catches a broken conversion (NaN/inf, O(1) errors); `compare` is the fidelity gate. A
# partly trained scenes-tiny denoiser gives up to 3e-2 in "fp16" (2e-3 in "mixed").
MAX_RELATIVE_DIFF = 0.1  # max |fp16 - fp32| / max |fp32|, per float output
MAX_ID_MISMATCH = 0.05  # fraction of token ids that differ (random latents have near-ties)


# --------------------------------------------------------------------- conversion


def _fp16_tensor(t: TensorProto) -> tuple[TensorProto, int]:
    """A FLOAT tensor as FLOAT16 (values clipped to the fp16 range); also the clip count."""
    a = numpy_helper.to_array(t).astype(np.float32)
    clipped = int(np.count_nonzero(np.abs(a) > FP16_MAX))
    out = numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)
    return out, clipped


def _convert_attributes(node: onnx.NodeProto) -> int:
    """Make a node that produces float data from attributes produce fp16 data."""
    clipped = 0
    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to" and a.i == FLOAT:
                a.i = FLOAT16
    elif node.op_type in ("Constant", "ConstantOfShape"):
        for a in list(node.attribute):
            if a.name == "value" and a.t.data_type == FLOAT:
                t, clipped = _fp16_tensor(a.t)
                a.t.CopyFrom(t)
            elif a.name in ("value_float", "value_floats"):
                values = np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
                node.attribute.remove(a)
                t, clipped = _fp16_tensor(numpy_helper.from_array(values))
                node.attribute.append(helper.make_attribute("value", t))
    return clipped


CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape"})


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(graph.node):
        for name in n.input:
            out[name].append(i)
    return out


def fp32_nodes(
    graph: onnx.GraphProto, keep_ops: frozenset[str] = KEEP_FP32_OPS,
    fp16_ops: frozenset[str] | None = None, fp16_inputs: frozenset[str] = frozenset(),
) -> set[int]:
    """Indices of the nodes that stay fp32: `keep_ops` (or, given `fp16_ops`, every op
    not in it), data movement on graph inputs (`DATA_MOVEMENT_OPS`), Softmaxes that
    only feed kept nodes, and constants that feed a kept node and Identity copies of
    initializers that feed a kept node (either is folded at load: a cast of a constant
    costs nothing at run time)."""

    def kept_op(op: str) -> bool:
        if op in CONSTANT_OPS:
            return False
        return op in keep_ops or (fp16_ops is not None and op not in fp16_ops)

    keep = {i for i, n in enumerate(graph.node) if kept_op(n.op_type)}
    # (An input that arrives in fp16 is moved in fp16: nothing to cast after the move.)
    moved = {i.name for i in graph.input if i.name not in fp16_inputs}
    for i, n in enumerate(graph.node):  # in topological order
        if n.op_type in DATA_MOVEMENT_OPS and n.input and n.input[0] in moved:
            keep.add(i)
            moved.update(n.output)
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        for i, n in enumerate(graph.node):
            if i in keep or n.op_type not in FOLLOW_FP32_OPS:
                continue
            users = [c for o in n.output for c in consumers[o]]
            if users and all(c in keep for c in users) and not set(n.output) & outputs:
                keep.add(i)
                changed = True
    inits = {t.name for t in graph.initializer}
    for i in reversed(range(len(graph.node))):  # consumers first, for Identity chains
        n = graph.node[i]
        if n.op_type in CONSTANT_OPS or n.op_type == "Identity" and n.input[0] in inits:
            keep.discard(i)
            if any(c in keep for c in consumers[n.output[0]]) or n.output[0] in outputs:
                keep.add(i)
                if n.op_type == "Identity":
                    inits.add(n.output[0])
    return keep


def convert_model(
    model: onnx.ModelProto, precision: str = "fp16", keep_ops: frozenset[str] = KEEP_FP32_OPS,
    fp16_ops: frozenset[str] | None = None, fp16_io: frozenset[str] = frozenset(),
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """An fp32 graph with fp16 weights and compute, its inputs and outputs unchanged
    except those named in `fp16_io`, which become float16 (precision fp16 only).

    precision "fp16": every node in fp16 but `keep_ops` (and the Softmaxes that only feed
    them); "mixed": only `fp16_ops` (default MIXED_FP16_OPS) in fp16. Returns the new
    model and a summary (fp32 compute nodes, casts inserted, values clipped).
    """
    if precision not in ("fp16", "mixed"):
        raise ValueError(f"cannot convert to {precision!r}")
    if precision == "mixed" and fp16_ops is None:
        fp16_ops = MIXED_FP16_OPS
    if fp16_io and precision != "fp16":
        raise ValueError("float16 inputs and outputs need precision fp16")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    unknown = fp16_io - {v.name for v in chain(g.input, g.output)}
    if unknown:
        raise ValueError(f"not inputs or outputs of the graph: {sorted(unknown)}")
    for n in g.node:
        if n.op_type in UNSUPPORTED_OPS or any(a.g.node or a.graphs for a in n.attribute):
            raise NotImplementedError(f"fp16 conversion does not handle {n.op_type} ({n.name})")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    elem = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in chain(inferred.graph.input, inferred.graph.output, inferred.graph.value_info)
    }
    elem.update({t.name: t.data_type for t in g.initializer})

    def is_float(name: str) -> bool:
        if not name:
            return False
        if name not in elem:
            raise ValueError(f"no type inferred for tensor {name!r}")
        return elem[name] == FLOAT

    keep = fp32_nodes(g, keep_ops, fp16_ops, fp16_io)
    consumers = _consumers(g)
    float_nodes = [
        i for i, n in enumerate(g.node)
        if n.op_type not in CONSTANT_OPS | {"Shape", "Size"}
        and any(map(is_float, chain(n.input, n.output)))
    ]
    kept = Counter(g.node[i].op_type for i in float_nodes if i in keep)
    # Float tensors that stay fp32: graph inputs, the outputs of kept nodes, and the
    # initializers that a kept node reads.
    fp32_tensors = {i.name for i in g.input if is_float(i.name) and i.name not in fp16_io}
    for i in keep:
        fp32_tensors.update(o for o in g.node[i].output if is_float(o))
    fp32_tensors.update(
        t.name for t in g.initializer
        if t.data_type == FLOAT and any(c in keep for c in consumers[t.name])
    )
    init_names = {t.name for t in g.initializer}
    fp16_outputs = [
        o.name for o in g.output
        if is_float(o.name) and o.name not in fp32_tensors and o.name not in fp16_io
    ]
    for name in fp16_outputs:
        if name in init_names or name in fp32_tensors:
            raise NotImplementedError(f"graph output {name!r} is not computed by a node")
    for o in g.output:
        if o.name in fp16_io and (o.name in fp32_tensors or o.name in init_names):
            raise NotImplementedError(f"output {o.name!r} is not computed in fp16")

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    clipped = 0

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], name=f"Cast_{out}", to=to))
            casts[(name, to)] = out
        return casts[(name, to)]

    for i, original in enumerate(g.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        want = FLOAT if i in keep else FLOAT16
        for k, name in enumerate(node.input):
            if is_float(name):
                have = FLOAT if name in fp32_tensors else FLOAT16
                if have != want:
                    node.input[k] = cast(name, want)
        if i not in keep:
            clipped += _convert_attributes(node)
        nodes.append(node)
    # fp16 results that are graph outputs: compute them under another name, cast back.
    renamed = {name: f"{name}__fp16" for name in fp16_outputs}
    for node in nodes:
        for seq in (node.input, node.output):
            for k, name in enumerate(seq):
                if name in renamed:
                    seq[k] = renamed[name]
    for name, tmp in renamed.items():
        nodes.append(helper.make_node("Cast", [tmp], [name], name=f"Cast_{name}_fp32", to=FLOAT))

    # The inputs and outputs asked for in fp16 are declared so (the outputs are computed
    # in fp16 already, above).
    for v in chain(g.input, g.output):
        if v.name in fp16_io:
            v.type.tensor_type.elem_type = FLOAT16

    inits = []
    for t in g.initializer:
        if t.data_type == FLOAT and t.name not in fp32_tensors:
            new, n = _fp16_tensor(t)
            clipped += n
        else:
            new = TensorProto()
            new.CopyFrom(t)
        inits.append(new)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    del model.graph.value_info[:]  # as exported: ONNX Runtime infers them again
    summary = {
        "fp16_nodes": len(float_nodes) - sum(kept.values()),
        "fp32_nodes": dict(sorted(kept.items())),
        "casts": len(casts) + len(renamed),
        "clipped_values": clipped,
    }
    return model, summary


# ------------------------------------------------------------------------ bundles


def read_manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def graph_differences(
    fp32: dict[str, onnx.ModelProto], fp16: dict[str, onnx.ModelProto],
    manifest: dict[str, Any], batch: int, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """fp16 vs fp32 graphs on random inputs in ONNX Runtime (CPU), per output:
    max_abs and rel (max_abs / max |fp32|) for float outputs, id_mismatch (the fraction
    of ids that differ) for int64 ones."""
    from .export import example_inputs

    cfg = LadicConfig.from_dict(manifest["model_config"])
    # A denoiser from before `kv_index` takes one K/V row per input row (docs/bundle.md).
    gathers = "kv_index" in {i["name"] for i in manifest["graphs"]["denoiser"]["inputs"]}
    examples = example_inputs(cfg, batch=batch, seed=seed, gather_kv=gathers)
    out: dict[str, dict[str, float]] = {}
    for name in GRAPHS:
        feed = {k: v.numpy() for k, v in examples[name].items()}
        want = _session(fp32[name]).run(None, feed)
        half = _session(fp16[name])
        # Inputs the converted graph takes in float16 (the K/V with --kv-precision fp16).
        feed16 = {
            i.name: feed[i.name].astype(np.float16) if i.type == "tensor(float16)" else feed[i.name]
            for i in half.get_inputs()
        }
        got = half.run(None, feed16)
        for spec, w, g in zip(manifest["graphs"][name]["outputs"], want, got):
            if g.dtype == np.float16 and w.dtype == np.float32:
                g = g.astype(np.float32)
            if g.dtype != w.dtype:
                raise RuntimeError(f"{name}.{spec['name']}: fp16 gives {g.dtype}, not {w.dtype}")
            if w.dtype == np.int64:
                out[f"{name}.{spec['name']}"] = {"id_mismatch": float(np.mean(g != w))}
            else:
                diff = float(np.abs(g.astype(np.float64) - w).max())
                if not np.isfinite(diff):  # NaN or inf: fp16 overflowed
                    diff = float("inf")
                scale = max(float(np.abs(w).max()), 1e-12)
                out[f"{name}.{spec['name']}"] = {"max_abs": diff, "rel": diff / scale}
    return out


def _worse(diffs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        k: v for k, v in diffs.items()
        if v.get("rel", 0.0) > MAX_RELATIVE_DIFF or v.get("id_mismatch", 0.0) > MAX_ID_MISMATCH
    }


# The tensors `kv_precision="fp16"` keeps in float16 between the graphs, per graph.
KV_FP16_IO = {"encoder": frozenset({"image_kv"}), "denoiser": frozenset({"image_kv"})}


def convert_bundle(
    src: Path, dst: Path | None = None, precision: str = "fp16", check: bool = True,
    kv_precision: str = "fp32",
) -> dict[str, Any]:
    """Convert an fp32 bundle's graphs to fp16 or mixed (`convert_model`), in place
    (dst None) or into a copy.

    `kv_precision="fp16"` (with precision fp16 and a denoiser that takes `kv_index`):
    the encoder's `image_kv` output and the denoiser's `image_kv` input in float16, so
    that the K/V pool the service keeps between them, and every row's gather from it,
    move half the bytes. The same values: the encoder computes its K/V in fp16 either
    way, and a cast commutes with a gather.

    The check (fp16 vs fp32 on random inputs, `export.check_batches`) runs before anything is
    written; a graph off by more than MAX_RELATIVE_DIFF raises. The manifest is removed
    before the graphs are written and rewritten after them. Returns the differences,
    the conversion summaries and the graph sizes in bytes.
    """
    from .export import check_batches, is_unconditional_half

    manifest = read_manifest(src)
    if manifest.get("precision", "fp32") != "fp32":
        raise ValueError(f"{src} is not an fp32 bundle (precision {manifest['precision']!r})")
    if kv_precision not in ("fp32", "fp16"):
        raise ValueError(f"kv_precision {kv_precision!r}: fp32 or fp16")
    kv16 = kv_precision == "fp16"
    denoiser_inputs = {i["name"] for i in manifest["graphs"]["denoiser"]["inputs"]}
    if kv16 and (precision != "fp16" or "kv_index" not in denoiser_inputs):
        raise ValueError("kv_precision fp16 needs precision fp16 and a denoiser with kv_index")
    files = {name: manifest["graphs"][name]["file"] for name in GRAPHS}
    fp32 = {name: onnx.load(str(src / f)) for name, f in files.items()}
    fp16: dict[str, onnx.ModelProto] = {}
    summary: dict[str, Any] = {}
    for name, model in fp32.items():
        io = KV_FP16_IO.get(name, frozenset()) if kv16 else frozenset()
        fp16[name], summary[name] = convert_model(model, precision, fp16_io=io)
    diffs: dict[str, dict[str, float]] = {}
    if check:
        for batch in check_batches(is_unconditional_half(manifest)):
            for k, v in graph_differences(fp32, fp16, manifest, batch, seed=batch).items():
                diffs[k] = {m: max(x, diffs.get(k, {}).get(m, 0.0)) for m, x in v.items()}
        bad = _worse(diffs)
        if bad:
            raise RuntimeError(f"fp16 graphs differ from fp32 beyond tolerance: {bad}")
    dst = dst or src
    if dst.resolve() != src.resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    sizes = {name: {"fp32": (src / f).stat().st_size} for name, f in files.items()}
    # The fp32 manifest must not describe half-written graphs: it goes first, and the
    # converted one is written last.
    (dst / "manifest.json").unlink(missing_ok=True)
    for name, f in files.items():
        onnx.save(fp16[name], str(dst / f))
        sizes[name]["fp16"] = (dst / f).stat().st_size
    manifest["precision"] = precision
    if kv16:
        for name, names in KV_FP16_IO.items():
            graph = manifest["graphs"][name]
            for spec in graph["inputs"] + graph["outputs"]:
                if spec["name"] in names:
                    spec["dtype"] = "float16"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"diffs": diffs, "summary": summary, "sizes": sizes}


def print_conversion(report: dict[str, Any]) -> None:
    for name, s in report["summary"].items():
        kept = ", ".join(f"{op} {n}" for op, n in s["fp32_nodes"].items()) or "none"
        print(f"{name}: {s['fp16_nodes']} float nodes in fp16; fp32: {kept}; "
              f"{s['casts']} casts, {s['clipped_values']} values clipped")
    for name, s in report["sizes"].items():
        print(f"{name}: {s['fp32']} -> {s['fp16']} bytes ({s['fp16'] / s['fp32']:.2f})")
    for k, v in sorted(report["diffs"].items()):
        print(f"{k}: fp16 vs fp32 " + ", ".join(f"{m} {x:.2e}" for m, x in v.items()))


# ----------------------------------------------------------------------- compare


class ProviderBackend(OnnxBackend):
    """A bundle's graphs in ONNX Runtime on the given execution providers."""

    def __init__(self, bundle: Path, providers: list[str], threads: int = 0) -> None:
        self.manifest = read_manifest(bundle)
        refuse_unconditional_half(self.manifest, bundle)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        graphs = self.manifest["graphs"]
        self.encoder, self.denoiser, self.decoder = (
            ort.InferenceSession(str(bundle / graphs[n]["file"]), opts, providers=providers)
            for n in GRAPHS
        )

    def providers(self) -> list[str]:
        return self.denoiser.get_providers()


PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass
class Agreement:
    images: int = 0
    ids_agree: int = 0  # all max_len decoder ids of the caption's row equal
    captions_agree: int = 0  # the cleaned caption ids equal
    positions: int = 0
    positions_differ: int = 0
    disagreements: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    @property
    def ids_fraction(self) -> float:
        return self.ids_agree / max(self.images, 1)

    @property
    def captions_fraction(self) -> float:
        return self.captions_agree / max(self.images, 1)


def agreement(
    a: Any, b: Any, pixels: np.ndarray, cfg: LadicConfig, params: SampleParams,
    seed: int = 0, batch: int = 16,
) -> Agreement:
    """Caption `pixels` with backends a and b (same noise: image i, candidate j draws from
    SeededNoise(seed + 1000 * i + j)) and count the captions whose ids agree."""
    text = TextIds(
        frozenset({cfg.text.pad_id, cfg.text.cls_id, cfg.text.sep_id, cfg.text.unk_id,
                   cfg.text.mask_id}),
        cfg.text.period_id,
    )
    shape = (cfg.text.max_len, cfg.latent_dim)
    s = cfg.image.image_size
    zeros = np.zeros((1, 3, s, s), np.float32)
    null_a, null_b = a.encode(zeros), b.encode(zeros)
    result = Agreement()
    for start in range(0, pixels.shape[0], batch):
        chunk = pixels[start : start + batch]

        def noise_for(i: int, j: int, start: int = start) -> SeededNoise:
            return SeededNoise(seed + 1000 * (start + i) + j, shape)

        caps_a = caption_images(a, chunk, params, cfg, noise_for, null_kv=null_a)
        caps_b = caption_images(b, chunk, params, cfg, noise_for, null_kv=null_b)
        for i, (ca, cb) in enumerate(zip(caps_a, caps_b)):
            ids_a, ids_b = ca.rows[ca.chosen].ids, cb.rows[cb.chosen].ids
            same = bool(np.array_equal(ids_a, ids_b))
            result.images += 1
            result.ids_agree += same
            result.captions_agree += clean_ids(ids_a, text) == clean_ids(ids_b, text)
            result.positions += ids_a.size
            result.positions_differ += int(np.count_nonzero(ids_a != ids_b))
            if not same:
                result.disagreements.append((start + i, ids_a.tolist(), ids_b.tolist()))
    return result


def compare_bundles(
    fp32: Path, fp16: Path, split: str, limit: int | None, seed: int = 0, batch: int = 16,
    provider: str = "cpu", steps: int | None = None, threads: int = 0,
) -> Agreement:
    """Caption the first `limit` images of a Scenes split with both bundles."""
    from .data import normalize, split_images

    ma, mb = read_manifest(fp32), read_manifest(fp16)
    if ma["model_config"] != mb["model_config"]:
        raise ValueError("the two bundles hold different models (model_config differs)")
    cfg = LadicConfig.from_dict(ma["model_config"])
    params = SampleParams.defaults(cfg)
    if steps:
        params.steps = steps
    pixels = normalize(split_images(split, cfg.image, count=limit), cfg.image).numpy()
    a = ProviderBackend(fp32, PROVIDERS[provider], threads)
    b = ProviderBackend(fp16, PROVIDERS[provider], threads)
    print(f"{fp32} ({ma.get('precision', 'fp32')}) on {a.providers()[0]}, "
          f"{fp16} ({mb.get('precision', 'fp32')}) on {b.providers()[0]}; "
          f"{pixels.shape[0]} images of {split}, {params.steps} steps")
    return agreement(a, b, pixels, cfg, params, seed=seed, batch=batch)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write an fp16 copy of an fp32 bundle (or convert in place)")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--out", type=Path, help="output directory (default: in place)")
    c.add_argument("--precision", choices=PRECISIONS[1:], default="fp16")
    c.add_argument("--no-check", action="store_true", help="skip the fp16 vs fp32 check")
    c.add_argument("--kv-precision", choices=["fp32", "fp16"], default="fp32",
                   help="the image K/V between encoder and denoiser (fp16: with --precision "
                   "fp16; half the bytes of the service's K/V pool and of every gather)")
    m = sub.add_parser("compare", help="caption agreement of an fp16 bundle with its fp32 one")
    m.add_argument("--fp32", type=Path, required=True)
    m.add_argument("--fp16", type=Path, required=True)
    m.add_argument("--split", default="test-seen")
    m.add_argument("--limit", type=int, help="the first N images (default: the whole split)")
    m.add_argument("--min-agreement", type=float, default=0.99)
    m.add_argument("--on", choices=["ids", "caption"], default="ids",
                   help="what must agree: all decoder ids, or the cleaned caption ids")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--steps", type=int, help="sampling iterations (default: the bundle's)")
    m.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    m.add_argument("--threads", type=int, default=0)
    m.add_argument("--show", type=int, default=5, help="disagreements to print")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "convert":
        report = convert_bundle(args.bundle, args.out, args.precision, check=not args.no_check,
                                kv_precision=args.kv_precision)
        print_conversion(report)
        print(f"wrote {args.out or args.bundle} (precision {args.precision})")
        return 0
    r = compare_bundles(args.fp32, args.fp16, args.split, args.limit, seed=args.seed,
                        batch=args.batch, provider=args.provider, steps=args.steps,
                        threads=args.threads)
    print(f"token ids agree on {r.ids_agree}/{r.images} captions ({r.ids_fraction:.4f}); "
          f"cleaned captions agree on {r.captions_agree}/{r.images} ({r.captions_fraction:.4f}); "
          f"{r.positions_differ}/{r.positions} positions differ")
    for index, ids_a, ids_b in r.disagreements[: args.show]:
        print(f"  image {index}: fp32 {ids_a}\n  {' ' * len(str(index))}        fp16 {ids_b}")
    got = r.ids_fraction if args.on == "ids" else r.captions_fraction
    if got < args.min_agreement:
        print(f"FAIL: agreement {got:.4f} < {args.min_agreement}")
        return 1
    print(f"ok: agreement {got:.4f} >= {args.min_agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
