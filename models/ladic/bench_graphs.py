"""Time one graph of two bundles side by side in ONNX Runtime (CPU), e.g. fused vs
unfused attention, or fp16 vs fp32:

    python -m ladic.bench_graphs BUNDLE_A BUNDLE_B --graph denoiser --batch 1,64
    python -m ladic.bench_graphs BUNDLE_A BUNDLE_B --nodes
    python -m ladic.bench_graphs BUNDLE_A BUNDLE_B --graph denoiser --batch 8 --ops

Both bundles get the same random inputs; runs alternate A, B, A, B... so that drift in
the machine's load hits both alike. Prints the median per call and the ratio A/B.
`--nodes` prints instead how many nodes each graph has as exported and after ONNX
Runtime's own optimizations (what a session runs per call: on a GPU each is a kernel
launch plus the executor's overhead). `--ops` prints, per operator type, the time
ONNX Runtime's profiler gives its nodes per call in A and in B (the warm-up call left out;
the profiler's own overhead makes the sums larger than the call's time), to see where a
change moved the time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import LadicConfig
from .export import example_inputs, is_unconditional_half


def random_feed(bundle: Path, graph: str, batch: int) -> dict[str, np.ndarray]:
    """The exporter's random inputs for `graph` (`export.example_inputs`), built from the
    model config the bundle's manifest carries."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    cfg = LadicConfig.from_dict(manifest["model_config"])
    specs = manifest["graphs"][graph]["inputs"]
    names = [io["name"] for io in specs]
    inputs = example_inputs(cfg, batch, gather_kv="kv_index" in names)[graph]

    def typed(io: dict) -> np.ndarray:  # type: ignore[type-arg]
        # A graph may take an input in float16 (the K/V with --kv-precision fp16).
        value = inputs[io["name"]].numpy()
        return value.astype(np.float16) if io["dtype"] == "float16" else value

    return {io["name"]: typed(io) for io in specs}


def node_counts(graph_file: Path) -> tuple[int, int]:
    """(nodes as exported, nodes after ONNX Runtime's ORT_ENABLE_ALL optimizations on
    the CPU provider)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # the "hardware specific" note on saving is expected
        ort.InferenceSession(str(graph_file), opts, providers=["CPUExecutionProvider"])
        optimized = len(onnx.load(opts.optimized_model_filepath).graph.node)
    return len(onnx.load(str(graph_file)).graph.node), optimized


def op_times(
    session_for_profiling: Callable[[], Any], feed: dict[str, np.ndarray], runs: int
) -> dict[str, float]:
    """Milliseconds per call that the profiler gives each operator type's nodes, over
    `runs` calls after one warm-up call (which is profiled too, and left out)."""
    sess = session_for_profiling()
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    profile.parent.rmdir()
    runs_after_warm_up = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e["name"] == "model_run"
    )[1:]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if any(start <= e["ts"] <= end for start, end in runs_after_warm_up):
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3
    return {op: ms / len(runs_after_warm_up) for op, ms in totals.items()}


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--graph", choices=["encoder", "denoiser", "decoder"], default="denoiser")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0, help="time per batch size")
    p.add_argument("--nodes", action="store_true", help="count the graphs' nodes, no timing")
    p.add_argument(
        "--ops", action="store_true", help="profiled time per operator type, A vs B, no timing"
    )
    p.add_argument("--runs", type=int, default=4, help="profiled calls per bundle (--ops)")
    args = p.parse_args(argv)

    if args.nodes:
        for bundle in (args.a, args.b):
            graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
            counts = {name: node_counts(bundle / g["file"]) for name, g in graphs.items()}
            each = (f"{n} {e} nodes ({o} after optimization)" for n, (e, o) in counts.items())
            print(f"{bundle}: " + ", ".join(each))
        return

    halves = [
        b for b in (args.a, args.b)
        if is_unconditional_half(json.loads((b / "manifest.json").read_text()))
    ]
    if args.graph == "denoiser" and halves and any(int(b) % 2 for b in args.batch.split(",")):
        p.error(f"{halves[0]} splits its denoiser's batch in halves: give even --batch sizes")

    def session(bundle: Path, profile: bool = False) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        if profile:
            opts.enable_profiling = True
            # A folder per session: the file name only has the time to the second.
            opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        file = json.loads((bundle / "manifest.json").read_text())["graphs"][args.graph]["file"]
        return ort.InferenceSession(str(bundle / file), opts, providers=["CPUExecutionProvider"])

    if args.ops:
        for batch in (int(b) for b in args.batch.split(",")):
            # The same values for both, each in the types its manifest says.
            feed_a, feed_b = (random_feed(b, args.graph, batch) for b in (args.a, args.b))
            ta = op_times(lambda: session(args.a, profile=True), feed_a, args.runs)
            tb = op_times(lambda: session(args.b, profile=True), feed_b, args.runs)
            print(
                f"{args.graph}, batch {batch}, {args.threads} thread(s), ms per call "
                f"({args.runs} profiled calls each): A = {args.a}, B = {args.b}"
            )
            print(f"  {'operator':<24}{'A':>10}{'B':>10}")
            for op in sorted(ta.keys() | tb.keys(), key=lambda o: -max(ta.get(o, 0), tb.get(o, 0))):
                print(f"  {op:<24}{ta.get(op, 0.0):10.2f}{tb.get(op, 0.0):10.2f}")
            print(f"  {'all nodes':<24}{sum(ta.values()):10.2f}{sum(tb.values()):10.2f}")
        return

    sa, sb = session(args.a), session(args.b)
    print(f"{args.graph}, {args.threads} thread(s): A = {args.a}, B = {args.b}")
    for batch in (int(b) for b in args.batch.split(",")):
        feed_a, feed_b = (random_feed(b, args.graph, batch) for b in (args.a, args.b))
        out_a, out_b = sa.run(None, feed_a)[0], sb.run(None, feed_b)[0]
        diff = float(np.abs(out_a.astype(np.float64) - out_b).max())
        times: tuple[list[float], list[float]] = ([], [])
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end or len(times[0]) < 3:
            for sess, feed, acc in ((sa, feed_a, times[0]), (sb, feed_b, times[1])):
                t0 = time.perf_counter()
                sess.run(None, feed)
                acc.append(time.perf_counter() - t0)
        ma, mb = (1e3 * float(np.median(t)) for t in times)
        print(
            f"batch {batch:4d}: A {ma:9.3f} ms  B {mb:9.3f} ms  A/B {ma / mb:5.2f}  "
            f"({len(times[0])} runs each; max |A-B| of the first output {diff:.1e})"
        )


if __name__ == "__main__":
    main()
