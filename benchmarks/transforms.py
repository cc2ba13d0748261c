"""What a transform of every Linear input costs beside the bare forward pass, in one process.

    python benchmarks/transforms.py                                   # hadamard, demo, 4 x 2048
    python benchmarks/transforms.py --transform hadamard --transform-seed 1 --repeat 5

Each round runs, side by side, the bare forward pass over the windows (one window a pass, only the
last position's logits, as the profile runs it) and the same pass with a forward pre-hook on every
decoder Linear that applies the transform to its input and drops the result: what a profile that
counts the kernel of ``transform.activation(x)`` pays for the transform itself. Layers fed the same
tensor (q/k/v, gate/up) share one application, as the profile's statistics do. Beside the ratio of
the best times, the ratio within each round (median and range), and the seconds spent inside the
transform per input width, summed over the windows (from the round with the best transformed time).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import kernelscope as ks
from kernelscope.capture import LinearInputCapture
from kernelscope.models import select_linear_layers
from kernelscope.quant.transforms import parse_transform
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.runs.transforming import TransformBinder

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "test.txt"


def bare(model, windows) -> None:
    with eval_mode(model):
        for row in windows.tokens:
            forward_windows(model, row[None])


def transformed(model, windows, layers, bound, spent: dict[int, float]) -> None:
    last: list = [None, None]

    def observer(name: str, x: torch.Tensor) -> None:
        t = bound.layers[name]
        if last[0] is x and last[1] is t:
            return
        start = time.perf_counter()
        t.activation(x)
        spent[t.width] = spent.get(t.width, 0.0) + time.perf_counter() - start
        last[:] = [x, t]

    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        for row in windows.tokens:
            forward_windows(model, row[None])
            last[:] = [None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default=str(DEFAULT_TEXT))
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transform", default="hadamard")
    parser.add_argument("--transform-seed", type=int, default=None)
    args = parser.parse_args()

    loaded = ks.load_model(args.model, dtype="float32", device="cpu")
    text = ks.load_text(args.dataset, max_chars=20 * args.nsamples * args.seqlen)
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), args.seqlen, args.nsamples)
    layers = select_linear_layers(loaded.model)
    spec = parse_transform(args.transform).with_seed(args.transform_seed)
    bound = TransformBinder(loaded.model, layers).bind(spec)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"model: {args.model}, float32; {len(windows)} x {args.seqlen} tokens; "
          f"{len(layers)} Linear layers; "
          f"transform {spec.label} ({', '.join(sorted({t.label for t in bound.layers.values()}))})")

    bare(loaded.model, windows)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "transformed": []}
    spent_rounds: list[dict[int, float]] = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        bare(loaded.model, windows)
        times["bare"].append(time.perf_counter() - start)
        spent: dict[int, float] = {}
        start = time.perf_counter()
        transformed(loaded.model, windows, layers, bound, spent)
        times["transformed"].append(time.perf_counter() - start)
        spent_rounds.append(spent)
    ratios = sorted(t / b for t, b in zip(times["transformed"], times["bare"], strict=True))
    best_bare, best = min(times["bare"]), min(times["transformed"])
    spent = spent_rounds[times["transformed"].index(best)]
    print(f"bare forward        {best_bare:8.2f} s (best of {args.repeat})")
    print(f"with the transform  {best:8.2f} s   best ratio {best / best_bare:.3f}x   per round: median "
          f"{statistics.median_low(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})")
    for width, seconds in sorted(spent.items()):
        print(f"  inside the transform, inputs of width {width}: {seconds:6.2f} s "
              f"({100 * seconds / best_bare:.1f}% of the bare pass)")
    total = sum(spent.values())
    print(f"  inside the transform, all inputs: {total:6.2f} s "
          f"({100 * total / best_bare:.1f}% of the bare pass)")


if __name__ == "__main__":
    main()
