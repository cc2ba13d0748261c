"""Overhead of kernelscope's passes against the bare forward pass, measured in one process.

    python benchmarks/overhead.py --nsamples 4 --seqlen 2048 --repeat 2

Each figure is the best of ``--repeat`` runs, the runs of the things compared interleaved, so that
machine noise hits them alike. Ratios are what to compare across machines, not seconds.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import kernelscope as ks
from kernelscope.models import select_linear_layers
from kernelscope.runs.evaluate import run_scheme
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.runs.schemes import parse_scheme

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "test.txt"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default=str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "pydoc")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--schemes", default="w8a8-per-token,w8a8-crossquant,remove-kernel-per-token")
    args = parser.parse_args()

    loaded = ks.load_model(args.model)
    text = ks.load_text(args.dataset)
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), args.seqlen, args.nsamples)
    model = loaded.model
    layers = select_linear_layers(model)
    schemes = [parse_scheme(s) for s in args.schemes.split(",")]

    def bare() -> None:
        with eval_mode(model):
            for i in range(len(windows)):
                forward_windows(model, windows.tokens[i : i + 1])

    def prof() -> None:
        ks.profile(model, windows, ks.default_configs(), layers=layers)

    fp = parse_scheme("fp")
    runs = [("bare forward", bare), ("profile (default set)", prof),
            ("eval fp", lambda: run_scheme(model, windows, fp, layers))]
    runs += [(f"eval {s.name}", lambda s=s: run_scheme(model, windows, s, layers)) for s in schemes]
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, fn in runs:
            best[name] = min(best.get(name, float("inf")), timed(fn))

    tokens = len(windows) * windows.seqlen
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {loaded.info['path']}; {windows.describe()}; best of {args.repeat}")
    for name, seconds in best.items():
        base = best["eval fp"] if name.startswith("eval ") else best["bare forward"]
        against = "eval fp" if name.startswith("eval ") else "bare forward"
        print(f"{name:32s} {seconds:8.2f} s  {tokens / seconds:8.0f} tok/s  {seconds / base:5.3f}x {against}")


if __name__ == "__main__":
    main()
