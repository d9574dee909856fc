"""Write a model bundle (docs/bundle.md) for the Rust service.

    python -m ladic.export --run runs/scenes-tiny --out scenes-tiny    # a trained run
    python -m ladic.export --random-init base --out /tmp/ladic-base    # full size, random
    python -m ladic.export --official CKPT --vit VIT --bert BERT --mean M --std S --out DIR
    python -m ladic.export --run runs/scenes-tiny --out scenes-tiny-fp16 --precision fp16
    python -m ladic.export --run runs/scenes-tiny --checkpoint CKPT --out DIR   # other weights

`--run` exports the newer of the run's final.pt and checkpoint.pt (by training step).
Every graph gets a dynamic batch axis; the export is checked against PyTorch with
ONNX Runtime before the manifest is written (an old manifest in --out is removed
first, so a failed export leaves no loadable bundle). `--precision fp16` (or `mixed`)
then converts the graphs in place (ladic/precision.py) and checks them against fp32.

On a host without network where some Python packages are missing (a GPU host that has
PyTorch only), a random-weight bundle can still be written:

    python -m ladic.export --random-init base --out DIR --no-check --no-onnx-package

`--no-check` skips the ONNX Runtime comparison (onnxruntime is then not imported);
`--no-onnx-package` lets torch's exporter run without the `onnx` package (see
`allow_export_without_onnx`); without `tokenizers` the placeholder tokenizer of a
random-weight bundle is written as plain JSON (`word_level_tokenizer_json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import LadicConfig, base_config, micro_config, tiny_config
from .model import Ladic, fused_attention_export
from .rundir import newest_weights, run_problem

FORMAT = "ladic-bundle"
FORMAT_VERSION = 1
# The first version that may set the denoiser's `unconditional_half` (docs/bundle.md):
# readers of version 1 would ignore it and run such a bundle wrong, so they must refuse it.
UNCONDITIONAL_HALF_FORMAT_VERSION = 2
EXPORTER = "ladic.export 0.1.0"
OPSET = 17


class EncoderGraph(nn.Module):
    def __init__(self, model: Ladic) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class DenoiserGraph(nn.Module):
    """The denoiser with `image_kv` as a pool of distinct K/V and `kv_index` choosing each
    row's (docs/bundle.md): rows that share an image send its K/V once per call."""

    def __init__(self, model: Ladic, unconditional_half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.unconditional_half = unconditional_half

    def forward(
        self, x_t: Tensor, self_cond: Tensor, t: Tensor, image_kv: Tensor, kv_index: Tensor
    ) -> Tensor:
        return self.model.denoise(x_t, self_cond, t, image_kv, kv_index, self.unconditional_half)


class LegacyDenoiserGraph(nn.Module):
    """The denoiser as bundles wrote it before `kv_index`: one `image_kv` row per row.
    Only for the service's compatibility test (ladic.fixtures)."""

    def __init__(self, model: Ladic) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: Tensor, self_cond: Tensor, t: Tensor, image_kv: Tensor) -> Tensor:
        return self.model.denoise(x_t, self_cond, t, image_kv)


class DecoderGraph(nn.Module):
    def __init__(self, model: Ladic) -> None:
        super().__init__()
        self.model = model

    def forward(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.decode(x0)


def io_spec(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def graph_specs(
    cfg: LadicConfig, gather_kv: bool = True, unconditional_half: bool = False
) -> dict[str, dict[str, Any]]:
    """The manifest's `graphs`. `unconditional_half` (docs/bundle.md): the denoiser's
    last half of rows attend to K/V slot 0 whatever their `kv_index`."""
    if unconditional_half and not gather_kv:
        raise ValueError("unconditional_half needs a denoiser that takes kv_index")
    s = cfg.image.image_size
    L, D = cfg.text.max_len, cfg.latent_dim
    kv = ["batch", 2 * cfg.diffuser.layers, cfg.image.tokens, cfg.diffuser_hidden]
    kv_inputs = (
        [
            io_spec("image_kv", "float32", ["kv_slots", *kv[1:]]),
            io_spec("kv_index", "int64", ["batch"]),
        ]
        if gather_kv
        else [io_spec("image_kv", "float32", kv)]
    )
    denoiser_layout = {"unconditional_half": True} if unconditional_half else {}
    return {
        "encoder": {
            "file": "encoder.onnx",
            "inputs": [io_spec("pixels", "float32", ["batch", 3, s, s])],
            "outputs": [io_spec("image_kv", "float32", kv)],
        },
        "denoiser": {
            "file": "denoiser.onnx",
            "inputs": [
                io_spec("x_t", "float32", ["batch", L, D]),
                io_spec("self_cond", "float32", ["batch", L, D]),
                io_spec("t", "int64", ["batch"]),
                *kv_inputs,
            ],
            "outputs": [io_spec("x0", "float32", ["batch", L, D])],
            **denoiser_layout,
        },
        "decoder": {
            "file": "decoder.onnx",
            "inputs": [io_spec("x0", "float32", ["batch", L, D])],
            "outputs": [
                io_spec("token_ids", "int64", ["batch", L]),
                io_spec("confidence", "float32", ["batch", L]),
            ],
        },
    }


def example_inputs(
    cfg: LadicConfig, batch: int, seed: int = 0, gather_kv: bool = True
) -> dict[str, dict[str, Tensor]]:
    """Random inputs per graph. With `gather_kv` the denoiser's pool has one slot more
    than the batch has rows (so that the two axes stay independent in the trace) and
    the rows pick slots at random, repeats included."""
    g = torch.Generator().manual_seed(seed)
    s, L, D = cfg.image.image_size, cfg.text.max_len, cfg.latent_dim
    slots = batch + 1 if gather_kv else batch
    kv_shape = (slots, 2 * cfg.diffuser.layers, cfg.image.tokens, cfg.diffuser_hidden)
    denoiser = {
        "x_t": torch.randn(batch, L, D, generator=g),
        "self_cond": torch.randn(batch, L, D, generator=g),
        "t": torch.randint(0, cfg.schedule.num_timesteps, (batch,), generator=g),
        "image_kv": torch.randn(*kv_shape, generator=g),
    }
    if gather_kv:
        denoiser["kv_index"] = torch.randint(0, slots, (batch,), generator=g)
    return {
        "encoder": {"pixels": torch.randn(batch, 3, s, s, generator=g)},
        "denoiser": denoiser,
        "decoder": {"x0": torch.randn(batch, L, D, generator=g)},
    }


def is_unconditional_half(manifest: dict[str, Any]) -> bool:
    """Whether a bundle's denoiser reads its second half of rows as unconditional."""
    return bool(manifest["graphs"]["denoiser"].get("unconditional_half", False))


def check_batches(unconditional_half: bool) -> tuple[int, int]:
    """The batch sizes the export checks run at: 1 and an odd one (so that the batch
    axis stays apart from the others in a trace), or even ones where the denoiser
    splits its rows in halves."""
    return (2, 4) if unconditional_half else (1, 3)


def denoise_reference(
    model: Ladic, inputs: dict[str, Tensor], unconditional_half: bool = False
) -> Tensor:
    """What the exported denoiser computes, in PyTorch, for either input form: each row's
    K/V gathered first, the second half's from slot 0 with `unconditional_half`."""
    kv = inputs["image_kv"]
    if "kv_index" in inputs:
        index = inputs["kv_index"]
        if unconditional_half:
            index = index.clone()
            index[index.shape[0] // 2 :] = 0
        kv = kv.index_select(0, index)
    return model.denoise(inputs["x_t"], inputs["self_cond"], inputs["t"], kv)


def export_graphs(
    model: Ladic,
    out: Path,
    gather_kv: bool = True,
    fused_attention: bool = False,
    unconditional_half: bool = False,
) -> None:
    """Write the three graphs. `fused_attention`: every attention as one ONNX Runtime
    MultiHeadAttention node (contrib domain com.microsoft; CPU and CUDA run it).
    `unconditional_half`: see `graph_specs`."""
    model.eval()
    specs = graph_specs(model.cfg, gather_kv, unconditional_half)
    wrappers = {
        "encoder": EncoderGraph(model),
        "denoiser": (
            DenoiserGraph(model, unconditional_half) if gather_kv else LegacyDenoiserGraph(model)
        ),
        "decoder": DecoderGraph(model),
    }
    examples = example_inputs(model.cfg, batch=2, gather_kv=gather_kv)
    for name, wrapper in wrappers.items():
        spec = specs[name]
        inputs = [i["name"] for i in spec["inputs"]]
        outputs = [o["name"] for o in spec["outputs"]]
        # Axis 0 is dynamic everywhere, named as in the manifest (batch or kv_slots).
        dynamic = {io["name"]: {0: io["shape"][0]} for io in spec["inputs"] + spec["outputs"]}
        fused = fused_attention_export() if fused_attention else contextlib.nullcontext()
        with torch.no_grad(), fused:
            torch.onnx.export(
                wrapper,
                tuple(examples[name][n] for n in inputs),
                str(out / spec["file"]),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                custom_opsets={"com.microsoft": 1} if fused_attention else None,
                dynamo=False,
            )
        fix_static_dims(out / spec["file"], spec)


def fix_static_dims(path: Path, spec: dict[str, Any]) -> bool:
    """Declare the manifest's fixed sizes on a graph's inputs and outputs: the exporter
    leaves some output axes symbolic (`Concatimage_kv_dim_2`). Needs the `onnx` package;
    returns False, changing nothing, without it."""
    try:
        import onnx
    except ImportError:
        return False
    model = onnx.load(str(path))
    shapes = {io["name"]: io["shape"] for io in spec["inputs"] + spec["outputs"]}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name]):
            if isinstance(size, int):
                dim.dim_value = size  # clears dim_param (one of the two)
    onnx.save(model, str(path))
    return True


def output_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference of two float arrays, divided by `want`'s largest magnitude
    where that is above 1."""
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return float(np.abs(got - want).max(initial=0.0)) / scale


def max_graph_difference(
    model: Ladic, bundle: Path, batch: int, unconditional_half: bool = False
) -> dict[str, float]:
    """Difference between ONNX Runtime and PyTorch on random inputs, per output: for
    float outputs the max abs difference, divided by the output's largest magnitude
    where that is above 1 (fp32 rounding grows with the values: the full-size model's
    outputs are larger than the small ones'); for ids the fraction that differ."""
    import onnxruntime as ort

    model.eval()
    specs = graph_specs(model.cfg, unconditional_half=unconditional_half)
    examples = example_inputs(model.cfg, batch=batch, seed=batch)
    torch_fns = {
        "encoder": lambda a: (model.encode_image(a["pixels"]),),
        "denoiser": lambda a: (denoise_reference(model, a, unconditional_half),),
        "decoder": lambda a: model.decode(a["x0"]),
    }
    diffs: dict[str, float] = {}
    for name, spec in specs.items():
        sess = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in examples[name].items()}
        got = sess.run(None, feed)
        with torch.no_grad():
            want = torch_fns[name](examples[name])
        for o, g, w in zip(spec["outputs"], got, want):
            key = f"{name}.{o['name']}"
            if o["dtype"] == "int64":
                diffs[key] = float(np.mean(g != w.numpy()))  # fraction of ids that differ
            else:
                diffs[key] = output_difference(g, w.numpy())
    return diffs


def manifest(
    cfg: LadicConfig, name: str, description: str, unconditional_half: bool = False
) -> dict[str, Any]:
    t = cfg.text
    return {
        "format": FORMAT,
        "format_version": (
            UNCONDITIONAL_HALF_FORMAT_VERSION if unconditional_half else FORMAT_VERSION
        ),
        "name": name,
        "description": description,
        "created_by": EXPORTER,
        "image": {
            "size": cfg.image.image_size,
            "resize_filter": cfg.image.resize_filter,
            "mean": list(cfg.image.mean),
            "std": list(cfg.image.std),
        },
        "text": {
            "max_len": t.max_len,
            "latent_dim": cfg.latent_dim,
            "vocab_size": t.vocab_size,
            "cls_id": t.cls_id,
            "sep_id": t.sep_id,
            "pad_id": t.pad_id,
            "period_id": t.period_id,
            "unk_id": t.unk_id,
            "special_ids": sorted({t.pad_id, t.cls_id, t.sep_id, t.unk_id, t.mask_id}),
            "tokenizer": "tokenizer.json",
        },
        "schedule": dict(vars(cfg.schedule)),
        "sampler": dict(vars(cfg.sampler)),
        "back_refine": dict(vars(cfg.back_refine)),
        "mbr": {"candidates": 1},
        "diffuser": {
            "layers": cfg.diffuser.layers,
            "hidden": cfg.diffuser_hidden,
            "image_tokens": cfg.image.tokens,
        },
        "precision": "fp32",  # fp16 | mixed: converted by ladic.precision
        "graphs": graph_specs(cfg, unconditional_half=unconditional_half),
        "model_config": cfg.to_dict(),
    }


def write_bundle(
    model: Ladic,
    tokenizer_json: Path,
    out: Path,
    name: str,
    description: str,
    check: bool = True,
    fused_attention: bool = False,
    unconditional_half: bool = False,
) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    # An old manifest beside new graphs would still load as a bundle: the manifest goes
    # first and comes back only after the graphs pass the check.
    (out / "manifest.json").unlink(missing_ok=True)
    export_graphs(
        model, out, fused_attention=fused_attention, unconditional_half=unconditional_half
    )
    if tokenizer_json.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    diffs: dict[str, float] = {}
    if check:
        for batch in check_batches(unconditional_half):
            for k, v in max_graph_difference(model, out, batch, unconditional_half).items():
                diffs[k] = max(diffs.get(k, 0.0), v)
        bad = {k: v for k, v in diffs.items() if v > 1e-4}
        if bad:
            raise RuntimeError(f"ONNX export differs from PyTorch: {bad}")
    written = manifest(model.cfg, name, description, unconditional_half)
    (out / "manifest.json").write_text(json.dumps(written, indent=2))
    return diffs


def load_run(run: Path, checkpoint: Path | None = None) -> tuple[Ladic, Path]:
    """A trained model from a `ladic.train` output directory: `checkpoint` if given, else
    the newer of the final weights and the last checkpoint (`rundir.newest_weights`)."""
    return load_run_weights(run, checkpoint)[:2]


def load_run_weights(run: Path, checkpoint: Path | None = None) -> tuple[Ladic, Path, Path]:
    """`load_run`, and the weights file it loaded."""
    problem = run_problem(run, weights=checkpoint is None)
    if problem:
        raise FileNotFoundError(problem)
    cfg = LadicConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = Ladic(cfg)
    if checkpoint is not None:
        path, blob = checkpoint, torch.load(checkpoint, map_location="cpu", weights_only=False)
    else:
        path, blob = newest_weights(run)
    if not isinstance(blob, dict) or "model" not in blob:
        raise ValueError(f"{path} holds no model weights (a checkpoint.pt or final.pt of a run)")
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as e:  # missing, unexpected or differently shaped tensors
        first = str(e).strip().splitlines()[:3]
        raise ValueError(
            f"{path} does not fit {run / 'config.json'} (weights of another model size or "
            f"run?): {' '.join(line.strip() for line in first)}"
        ) from None
    return model.eval(), run / "tokenizer.json", path


def placeholder_tokenizer(cfg: LadicConfig, path: Path) -> Path:
    """A word-level tokenizer with the config's special ids, for random-weight bundles.

    Written by the `tokenizers` package when it is installed; otherwise (a host with
    PyTorch only) as the same JSON built by hand (`word_level_tokenizer_json`)."""
    t = cfg.text
    named = {
        t.pad_id: "[PAD]",
        t.cls_id: "[CLS]",
        t.sep_id: "[SEP]",
        t.unk_id: "[UNK]",
        t.mask_id: "[MASK]",
        t.period_id: ".",
    }
    vocab = [named.get(i, f"w{i}") for i in range(t.vocab_size)]
    try:
        from .tokenizer import tokenizer_from_vocab
    except ImportError:
        print("tokenizers is not installed: writing the placeholder tokenizer as plain JSON")
        path.write_text(json.dumps(word_level_tokenizer_json(vocab, t.max_len), indent=2))
        return path
    tokenizer_from_vocab(vocab, t.max_len).save(str(path))
    return path


def word_level_tokenizer_json(vocab: list[str], max_len: int) -> dict[str, Any]:
    """What `tokenizer.tokenizer_from_vocab(vocab, max_len).save()` writes (tokenizers'
    JSON format 1.0), without the `tokenizers` package."""
    ids = {tok: i for i, tok in enumerate(vocab)}
    # tokenizer.SPECIAL_TOKENS (not imported: that module needs `tokenizers`).
    added = sorted((ids[tok], tok) for tok in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"))

    def template(parts: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        return [{kind: {"id": name, "type_id": type_id}} for kind, name, type_id in parts]

    return {
        "version": "1.0",
        "truncation": {
            "direction": "Right",
            "max_length": max_len,
            "strategy": "LongestFirst",
            "stride": 0,
        },
        "padding": {
            "strategy": {"Fixed": max_len},
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": ids["[PAD]"],
            "pad_type_id": 0,
            "pad_token": "[PAD]",
        },
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in added
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}],
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template(
                [("SpecialToken", "[CLS]", 0), ("Sequence", "A", 0), ("SpecialToken", "[SEP]", 0)]
            ),
            "pair": template([("Sequence", "A", 0), ("Sequence", "B", 1)]),
            "special_tokens": {
                tok: {"id": tok, "ids": [ids[tok]], "tokens": [tok]} for tok in ("[CLS]", "[SEP]")
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": "[UNK]"},
    }


def allow_export_without_onnx() -> bool:
    """Let torch's TorchScript ONNX exporter run when the `onnx` package is missing.

    The exporter serializes the graph itself; it imports `onnx` only to insert custom
    onnxscript functions into the model, and these graphs use none (standard ONNX ops,
    no custom opsets), so that step is replaced by a pass-through. Does nothing when
    `onnx` is importable. Returns whether the pass-through was installed."""
    try:
        import onnx  # noqa: F401

        return False
    except ImportError:
        pass
    import importlib

    for name in (
        "torch.onnx._internal.torchscript_exporter.onnx_proto_utils",
        "torch.onnx._internal.onnx_proto_utils",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "_add_onnxscript_fn"):
            module._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
            print(f"onnx is not installed: {name}._add_onnxscript_fn bypassed")
            return True
    print(
        "onnx is not installed and this torch has no known hook to bypass; "
        "the export will likely fail"
    )
    return False


def random_model(size: str, seed: int) -> Ladic:
    torch.manual_seed(seed)
    scenes_ids = dict(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4, period_id=5)
    if size == "base":
        cfg = base_config()
    elif size == "tiny":
        cfg = tiny_config(48, scenes_ids)
    elif size == "micro":
        cfg = micro_config(24, scenes_ids)
    else:
        raise ValueError(f"unknown size {size!r}")
    return Ladic(cfg).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a ladic.train output directory")
    src.add_argument("--random-init", choices=["base", "tiny", "micro"])
    src.add_argument("--official", type=Path, help="the released LaDiC checkpoint")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="with --run: these weights (default: the newer of final.pt and checkpoint.pt)",
    )
    p.add_argument("--vit", type=Path, help="BLIP checkpoint with the ViT (official only)")
    p.add_argument("--bert", type=Path, help="bert-base-uncased directory (official only)")
    p.add_argument("--mean", type=Path, help="latent mean pickle (official only)")
    p.add_argument("--std", type=Path, help="latent std pickle (official only)")
    p.add_argument(
        "--decoder-layers",
        type=int,
        default=0,
        help="upper BERT layers in the decoder (official only; 0 = as released)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load official files that hold Python objects besides tensors (this runs\n"
        "code from the file: only for files you trust)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", help="bundle name (default: the output directory's name)")
    p.add_argument("--steps", type=int, help="default sampling iterations in the manifest")
    p.add_argument(
        "--guidance",
        type=float,
        help="default classifier-free guidance weight in the manifest (0 = no\n"
        "unconditional pass: half the denoiser rows)",
    )
    p.add_argument(
        "--self-conditioning",
        choices=["on", "off"],
        help="default self-conditioning in the manifest (feed back the last x0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the ONNX vs PyTorch check (onnxruntime is then not needed)",
    )
    p.add_argument(
        "--no-onnx-package",
        action="store_true",
        help="if the `onnx` package is missing, export without it\n"
        "(allow_export_without_onnx; fp32 only)",
    )
    p.add_argument(
        "--attention",
        choices=["fused", "unfused"],
        default="unfused",
        help="fused: each attention as one ONNX Runtime MultiHeadAttention node\n"
        "(fewer kernels; flash attention on CUDA); unfused: standard ONNX ops only",
    )
    p.add_argument(
        "--kv-precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="with --precision fp16: the image K/V between the encoder and the denoiser in\n"
        "fp16 too (half the bytes of the service's K/V pool and of every row's gather)",
    )
    p.add_argument(
        "--unconditional-half",
        action="store_true",
        help="the denoiser reads the second half of each call's rows as the unconditional\n"
        "pass and attends to the null K/V once for all of them instead of a copy per row\n"
        "(less memory traffic with guidance on a GPU; the service lays its calls out to\n"
        "match; the Python sampler does not run such bundles)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "mixed"],
        default="fp32",
        help="fp16 or mixed: export fp32, then convert the graphs (ladic.precision)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad values and missing files before anything is loaded or written."""
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        p.error(f"--guidance must be at least 0, got {args.guidance}")
    if args.kv_precision != "fp32" and args.precision != "fp16":
        p.error("--kv-precision fp16 needs --precision fp16")
    if args.no_onnx_package and args.precision != "fp32":
        p.error("--no-onnx-package: --precision fp16/mixed needs the onnx package")
    if args.checkpoint is not None and not args.run:
        p.error("--checkpoint needs --run")
    if args.run:
        problem = run_problem(args.run, weights=args.checkpoint is None)
        if problem:
            p.error(problem)
        if args.checkpoint is not None and not args.checkpoint.is_file():
            p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.official:
        absent = [f"--{n}" for n in ("bert", "mean", "std") if getattr(args, n) is None]
        if absent:
            p.error(f"--official needs {', '.join(absent)} (see ladic/official.py)")
        for name in ("official", "vit", "bert", "mean", "std"):
            path = getattr(args, name)
            if path is not None and not path.exists():
                p.error(f"--{name} {path}: no such file or directory")


def load_source(args: argparse.Namespace, out: Path) -> tuple[Ladic, Path, str]:
    """The model the arguments name, its tokenizer file (written into `out`, created
    here, for random and official weights) and the bundle description."""
    if args.run:
        model, tok = load_run(args.run, args.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        return model, tok, f"LaDiC {model.cfg.name} trained on Scenes"
    if args.random_init:
        model = random_model(args.random_init, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        tok = placeholder_tokenizer(model.cfg, out / "tokenizer.json")
        return model, tok, f"LaDiC {args.random_init}, random weights (for speed tests only)"
    from .official import bert_tokenizer_json, load_official

    model = load_official(
        args.official,
        vit=args.vit,
        bert=args.bert,
        mean=args.mean,
        std=args.std,
        decoder_layers=args.decoder_layers,
        allow_pickle=args.allow_pickle,
    )
    out.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer_json(args.bert, model.cfg.text.max_len, out / "tokenizer.json")
    return model, tok, "LaDiC (official release checkpoint)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    if args.no_onnx_package:
        allow_export_without_onnx()
    try:
        model, tok, description = load_source(args, out)
    except (OSError, ValueError) as e:  # OfficialCheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if args.steps is not None:
        model.cfg.sampler.steps = args.steps
    if args.guidance is not None:
        model.cfg.sampler.guidance = args.guidance
    if args.self_conditioning is not None:
        model.cfg.sampler.self_conditioning = args.self_conditioning == "on"
    diffs = write_bundle(
        model,
        tok,
        out,
        args.name or out.name,
        description,
        check=not args.no_check,
        fused_attention=args.attention == "fused",
        unconditional_half=args.unconditional_half,
    )
    for k, v in sorted(diffs.items()):
        print(f"{k}: max |onnx - torch| = {v:.2e}")
    if args.precision != "fp32":
        from .precision import convert_bundle, print_conversion

        try:
            report = convert_bundle(
                out, precision=args.precision, check=not args.no_check,
                kv_precision=args.kv_precision,
            )
        except BaseException:
            # The fp32 bundle is not what was asked for: leave nothing servable.
            (out / "manifest.json").unlink(missing_ok=True)
            raise
        print_conversion(report)
    print(f"wrote {out} (precision {args.precision})")


if __name__ == "__main__":
    main()
