"""The per-element count of a profile three ways, on real inputs of the demo model, in one process:
the C loops (the CPU default), the torch code as it runs eagerly (what a GPU runs), and the same torch
code compiled with ``torch.compile(fullgraph=True)``.

    python benchmarks/count_backends.py                      # default set and the formats, 1 window of 2048
    python benchmarks/count_backends.py --seqlen 512 --threads 1 --repeat 9

The inputs are the activations of a few decoder Linears of one window (q_proj, o_proj, gate_proj and
down_proj of the first, a middle and the last block), captured once. Each backend counts every input
once per round; the best round is reported, and the ratio to the C loops within each round (median).
All three must give the same integers: the script checks it before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import kernelscope as ks
from kernelscope import element as E
from kernelscope.capture import LinearInputCapture
from kernelscope.element import reference
from kernelscope.models import select_linear_layers
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.stats import HISTOGRAM

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "test.txt"
SETS = {
    "default": (["per_token", "crossquant"], [8, 4]),
    "formats": (["per_token", "crossquant", "per_group", "fp8_per_token", "fp8_per_tensor", "mxfp8", "mxfp4",
                 "mxfp4_rceil", "nvfp4"], [8, 4]),
}
ROLES = ("q_proj", "o_proj", "gate_proj", "down_proj")


def captured_inputs(seqlen: int, text: str) -> list[torch.Tensor]:
    """Inputs ``(1, T, I)`` of a few Linears of the demo model on the first window of ``text``."""
    loaded = ks.load_model("demo")
    ids = ks.tokenize(loaded.tokenizer, ks.load_text(text).text)
    windows = ks.make_windows(ids, seqlen, 1)
    layers = select_linear_layers(loaded.model)
    blocks = sorted({layer.block for layer in layers})
    chosen = {layer.name: layer.module for layer in layers
              if layer.block in (blocks[0], blocks[len(blocks) // 2], blocks[-1])
              and layer.module_type in ROLES}
    seen: list[torch.Tensor] = []
    with eval_mode(loaded.model), LinearInputCapture(chosen, lambda name, x: seen.append(x.detach().clone())):
        forward_windows(loaded.model, windows.tokens)  # (1, T)
    return seen


def counter(backend: str, plan):
    """A function counting one input with ``plan`` on ``backend``: native, eager or compiled."""
    if backend == "native":
        return lambda x, r, pairs: E.count(x, r, plan, pairs)
    count = reference.count if backend == "eager" else torch.compile(reference.count, fullgraph=True,
                                                                       dynamic=False)
    return lambda x, r, pairs: count(x, r, plan, pairs)


def fields(counted) -> list[torch.Tensor]:
    return [t.clone() for t in E.fields(counted)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text", default=str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "pydoc")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = captured_inputs(args.seqlen, args.text)
    print(f"{len(inputs)} inputs of {args.seqlen} tokens, {torch.get_num_threads()} threads, "
          f"{E.describe()}, torch {torch.__version__}")
    for name, (quantizers, bits) in SETS.items():
        plan = E.make_plan(ks.expand_configs(quantizers, bits, [ks.DEFAULT_ALPHA], 128), HISTOGRAM)
        prepared = [(x, E.ranges(x)) for x in inputs]
        prepared = [(x, r, E.factors(r, plan)) for x, r in prepared]
        backends = {b: counter(b, plan) for b in ("native", "eager", "compiled")}
        started = time.perf_counter()
        want = [fields(backends["native"](*p)) for p in prepared]
        for backend in ("eager", "compiled"):
            got = [fields(backends[backend](*p)) for p in prepared]  # also the compilation
            same = all(torch.equal(a, b)
                       for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
            if not same:
                raise SystemExit(f"{name}: the {backend} count differs from the C count")
        print(f"\n## {name}: {len(plan.configs)} configurations (checked equal; warm-up and compilation "
              f"{time.perf_counter() - started:.1f} s)")
        rounds: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(args.repeat):
            for backend, run in backends.items():
                start = time.perf_counter()
                for p in prepared:
                    run(*p)
                rounds[backend].append(time.perf_counter() - start)
        print(f"{'backend':<10} {'best s':>8} {'best ratio':>11} {'median ratio in rounds':>24}")
        for backend, times in rounds.items():
            ratios = [t / n for t, n in zip(times, rounds["native"], strict=True)]
            print(f"{backend:<10} {min(times):8.3f} {min(times) / min(rounds['native']):10.2f}x "
                  f"{statistics.median(ratios):23.2f}x")


if __name__ == "__main__":
    main()
