"""Regenerate the demo figures the guides quote, from this version, on this machine.

    python benchmarks/docs_figures.py                  # every section; writes docs/benchmarks/*.txt
    python benchmarks/docs_figures.py --only eval

Each section runs the documented command through the command line (so it measures what a user's run
measures) into a scratch folder and writes the figures the guide quotes to
``docs/benchmarks/<section>-demo.txt``, with the commit, the machine and the seconds it took. The
weight-quantized perplexities are machine-sensitive (on this GGUF-derived model exact ties make the last
bit of a matmul decide a rounding: see docs/perplexity.md); kernels, remove-kernel figures and the
equality of a target with its library are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "test.txt"
OUT = ROOT / "docs" / "benchmarks"
SECTIONS = {
    "profile": ["profile", "demo", "--dataset", "pydoc", "--nsamples", "4", "--seqlen", "512"],
    "eval": ["eval", "demo", "-d", str(TEXT), "-n", "2", "-s", "1024", "--scheme",
             "fp,w8a8-per-token,w8a8-crossquant,remove-kernel-per-token,llm-compressor:W8A8"],
    "advise": ["advise", "demo", "-d", str(TEXT), "-n", "2", "-s", "1024", "--holdout", "2", "--scheme",
               "w8a8-per-token", "--tolerance", "0.01"],
}
"""Section -> the documented command (without -o), as the README, docs/perplexity.md and docs/advise.md
give it."""


def run(args: list[str], folder: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kernelscope", *args, "-o", str(folder), "--quiet"], check=True)
    return json.loads((folder / "summary.json").read_text()), time.perf_counter() - started


def change(r: dict) -> str:
    return f"{r['change_pct']:+.2f}% [{r['change_pct_ci_low']:+.2f}, {r['change_pct_ci_high']:+.2f}]"


def profile_lines(s: dict) -> list[str]:
    rows = [f"| {r['config']} | {100 * r['kernel_fraction']:.2f}% | {r['kernel_elements']:,} | "
            f"{r['elements']:,} |" for r in s["model_level"]]
    pairs = s["model_level"][0].get("c_ge_t_fraction")
    tail = [] if pairs is None else ["", f"pairs with c_j >= t_i: {100 * pairs:.2f}%"]
    return ["| quantizer | kernel | kernel elements | of elements |", "|---|---|---|---|", *rows, *tail]


def eval_lines(s: dict) -> list[str]:
    lines = ["| scheme | perplexity | 95% CI | vs fp, paired | activation kernel |", "|---|---|---|---|---|"]
    for r in s["results"]:
        vs = change(r) if r.get("change_pct") is not None else ""
        kernel = f"{100 * r['kernel_fraction']:.2f}%" if r.get("kernel_fraction") is not None else ""
        lines.append(f"| {r['scheme']} | {r['perplexity']:.4f} | [{r['perplexity_ci_low']:.2f}, "
                     f"{r['perplexity_ci_high']:.2f}] | {vs} | {kernel} |")
    return lines


def advise_lines(s: dict) -> list[str]:
    p, k, ke = s["plan"], s["kernel"], s["kernel_explains"]
    scheme, whole = s["scheme"]["scheme"], s["quantized"]
    share = ("the kernel's share is undefined" if ke["share"] is None else
             f"the kernel explains {100 * ke['share']:.0f}% [{100 * ke['ci_low']:.0f}, "
             f"{100 * ke['ci_high']:.0f}]")
    total = p["kept_layers"] + p["quantized_layers"]
    lines = [
        (f"fp {s['fp']['perplexity']:.4f}; {scheme} alone {whole['perplexity']:.4f} ({change(whole)}); "
        f"its kernel alone {change(k)}"),
        share,
        (f"plan: keep {p['kept_layers']} of {total} layers ({len(p['kept_cells'])} cells, "
        f"{100 * p['parameter_share']:.1f}% of the parameters); on the selection windows "
        f"{p['perplexity']:.4f}, {change(p)}"),
        f"cost: {s['forward_passes']:.1f} full-pass equivalents, {s['runs']} runs",
    ]
    h = p.get("holdout")
    if h:
        lines.append(f"held out ({h['windows']['windows']} windows): fp {h['fp']['perplexity']:.4f}, plan "
                     f"{h['plan']['perplexity']:.4f} ({change(h['plan'])}), the scheme alone "
                     f"{change(h['quantized'])}; within tolerance: {h['within_tolerance']} (by its interval: "
                     f"{h['within_tolerance_by_interval']})")
    return lines


SHOW = {"profile": profile_lines, "eval": eval_lines, "advise": advise_lines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(SECTIONS), action="append")
    args = ap.parse_args()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    for name in args.only or SECTIONS:
        with tempfile.TemporaryDirectory() as scratch:
            summary, seconds = run(SECTIONS[name], Path(scratch) / "run")
        command = "kernelscope " + " ".join(SECTIONS[name]).replace(str(ROOT.parent), "..")
        machine = f"commit {commit}, {platform.machine()}, torch {summary['versions'].get('torch')}"
        head = [command, f"{machine}, {seconds:.0f} s", ""]
        text = "\n".join(head + SHOW[name](summary)) + "\n"
        (OUT / f"{name}-demo.txt").write_text(text, encoding="utf-8")
        print(text)


if __name__ == "__main__":
    main()
