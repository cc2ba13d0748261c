"""Deployment targets on a real model: kernelscope's figure against the model the library produces.

    python benchmarks/targets.py                                  # demo, WikiText-2 test, 2 x 1024
    python benchmarks/targets.py --out docs/benchmarks/targets-demo.txt

For each target, the perplexity ``kernelscope eval --scheme LIBRARY:NAME`` gives, and the perplexity of
the same model quantized by the library itself on the same windows, with their relative difference:
compressed-tensors' ``apply_quantization_config`` and quantized forward for llm-compressor (weight scales
and static activation scales set from min-max observers, the activation ones on the calibration windows
with the model in full precision, as kernelscope calibrates them), ``mtq.quantize`` with max calibration
on the same calibration windows for ModelOpt, the linears that share an input then given one amax as its
checkpoint export gives them (``requantize_resmooth_fused_llm_layers``), and its NVFP4 and MXFP4 blocks,
which it fake-quantizes only in CUDA kernels, through its own pure-torch quantizers
(``tests.oracles.modelopt_on_cpu``). Beside them, the
paper's own formats (kernelscope's arithmetic) for comparison. Writes a markdown table, the README's.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the oracle lives with the tests

import kernelscope as ks  # noqa: E402
from kernelscope.runs.evaluate import evaluate  # noqa: E402
from kernelscope.runs.schemes import parse_scheme  # noqa: E402
from tests.oracles import library_model, modelopt_model, modelopt_on_cpu, window_nll  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LLM_COMPRESSOR = ("W8A8", "FP8_DYNAMIC", "FP8", "NVFP4A16", "NVFP4", "MXFP4", "MXFP8")
MODELOPT = ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG",
            "NVFP4_DEFAULT_CFG", "MXFP4_DEFAULT_CFG")
TARGETS = ",".join([*(f"llm-compressor:{n}" for n in LLM_COMPRESSOR), *(f"modelopt:{n}" for n in MODELOPT)])
"""The demo's widths (576, 1536) are not multiples of 128, so the W4A16/W4A8 presets do not apply to it."""
PAPER = ("w8a8-per-token", "fp8", "nvfp4", "mxfp4", "mxfp4-rceil")


def demo_arguments(ap: argparse.ArgumentParser) -> None:
    """The model, test text and calibration text of a demo measurement, and where to write it."""
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dataset", default=str(DATA / "wikitext-2-raw" / "test.txt"))
    ap.add_argument("--calib-dataset", default=str(DATA / "wikitext-2" / "wiki.valid.tokens"))
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--calib-nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)


def demo_windows(args: argparse.Namespace):
    """``(loaded model, test windows, calibration windows)``: the first windows of the test text, and
    random ones (seed 0) of the calibration text, float32 on CPU."""
    loaded = ks.load_model(args.model, dtype="float32", device="cpu")
    text = ks.load_text(args.dataset)
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), args.seqlen, args.nsamples)
    calib_text = ks.load_text(args.calib_dataset, max_chars=20 * args.calib_nsamples * args.seqlen)
    calibration = ks.make_windows(ks.tokenize(loaded.tokenizer, calib_text.text), args.seqlen,
                                  args.calib_nsamples, selection="random", seed=0)
    return loaded, windows, calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo_arguments(ap)
    ap.add_argument("--targets", default=TARGETS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    loaded, windows, calibration = demo_windows(args)
    targets = [parse_scheme(n) for n in args.targets.split(",") if n.strip()]
    schemes = [parse_scheme("fp"), *targets, *(parse_scheme(p) for p in PAPER)]
    result = evaluate(loaded, windows, schemes, calibration=calibration)
    rows = {r["scheme"]: r for r in result.table.iter_rows(named=True)}
    where = [str(path).replace(str(ROOT.parent), "..") for path in (args.dataset, args.calib_dataset)]
    setting = (f"model {args.model}, {args.nsamples} x {args.seqlen} windows of {where[0]}; calibration "
               f"{args.calib_nsamples} x {args.seqlen} random windows of {where[1]}")
    machine = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
    lines = [setting, machine, "",
             "| scheme | kernelscope | library-applied model | relative difference | vs fp (paired 95% CI) |",
             "|---|---|---|---|---|"]
    fp = rows["fp"]["perplexity"]
    lines.append(f"| fp | {fp:.4f} | | | |")
    for scheme in targets:
        row, target = rows[scheme.name], scheme.target
        build = modelopt_model if target.library == "modelopt" else library_model
        with modelopt_on_cpu():
            theirs = ks_perplexity(window_nll(build(loaded.model, target.name, calibration), windows))
        rel = abs(row["perplexity"] - theirs) / theirs
        figures = f"{row['perplexity']:.4f} | {theirs:.4f} | {rel:.1e}"
        lines.append(f"| {scheme.name} | {figures} | {change(row)} |")
    for name in PAPER:
        row = rows[name]
        lines.append(f"| {name} (kernelscope's arithmetic) | {row['perplexity']:.4f} | | | {change(row)} |")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report, encoding="utf-8")


def ks_perplexity(window_nll: list[float]) -> float:
    import math

    return math.exp(sum(window_nll) / len(window_nll))


def change(row: dict) -> str:
    return (f"{row['change_pct']:+.2f}% [{row['change_pct_ci_low']:+.2f}, {row['change_pct_ci_high']:+.2f}]"
            if row.get("change_pct") is not None else "")


if __name__ == "__main__":
    main()
