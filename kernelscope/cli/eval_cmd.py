"""``kernelscope eval``, ``threshold`` and ``sweep``: perplexity under quantization schemes."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from kernelscope.cli.common import check_positive, finish, header, prepare, stage_progress
from kernelscope.cli.console import fail, out, pct
from kernelscope.cli.profile_cmd import check_alphas, check_bits
from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig

DEFAULT_SCHEMES = ("fp", "w8a8-per-token", "w8a8-crossquant")


def _common(kw: dict, **extra) -> dict:
    keys = ("model", "dataset", "nsamples", "seqlen", "windows", "seed", "layers", "batch_size", "dtype",
            "device", "trust_remote_code", "output", "overwrite", "report", "device_map", "max_memory",
            "offload_folder")
    return {k: kw[k] for k in keys} | {"quiet": kw["quiet"] or kw["as_json"]} | extra


def _check_weights(weight_bits, group_size) -> None:
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    if group_size is not None and group_size < 1:
        fail(f"--group-size must be at least 1, got {group_size}")
    if group_size is not None and weight_bits is None:
        fail("--group-size applies to quantized weights; give --weight-bits too")


def _details(r: dict) -> str:
    """What the scheme name does not already say."""
    parts = []
    if r["mode"] == "remove_kernel":
        parts.append(f"kernel of {r['activation_quantizer']} int{r['activation_bits']}")
        parts.append("weights fp" if r["weight_bits"] is None else f"W{r['weight_bits']}")
    if r["alpha"] is not None:
        parts.append(f"α={r['alpha']:g}")
    if r["smooth_alpha"] is not None:
        parts.append(f"smoothing α={r['smooth_alpha']:g}")
    return ", ".join(parts)


def _show_eval(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope eval"))
    fp = next((r["perplexity"] for r in s["results"] if r["scheme"] == "fp"), None)
    table = Table(title="Perplexity (lm_head in full precision; weights per-channel unless gN)")
    table.add_column("scheme", no_wrap=True)
    table.add_column("details")
    for col in ("perplexity", "vs fp", "act. kernel", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in s["results"]:
        rel = "" if fp is None or r["scheme"] == "fp" else f"{100 * (r['perplexity'] / fp - 1):+.2f}%"
        table.add_row(escape(r["scheme"]), _details(r), f"{r['perplexity']:.4f}", rel,
                      pct(r["kernel_fraction"]), f"{r['seconds']:.1f}")
    out.print(table)
    for r in s["results"]:
        if not r.get("finite", True):
            out.print(f"[yellow]warning:[/] {escape(r['scheme'])} produced NaN or infinite logits; "
                      "its perplexity is not a measurement")


def run_eval(*, scheme, alpha, bits, weight_bits, group_size, smooth_alpha, calib_dataset, calib_nsamples,
             **kw) -> None:
    from kernelscope.data import load_text, make_windows, tokenize
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    check_alphas([alpha, smooth_alpha])
    check_bits([bits])
    _check_weights(weight_bits, group_size)
    schemes = [parse_scheme(s, alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                            smooth_alpha=smooth_alpha) for s in (scheme or DEFAULT_SCHEMES)]
    names = [s.name for s in schemes]
    if len(set(names)) != len(names):
        fail("a --scheme is given twice")
    check_positive("--calib-nsamples", calib_nsamples)
    calibration = calib_text = None
    smoothing = any(s.smooth_alpha is not None for s in schemes)
    if smoothing:  # read before the model loads, so that a missing text fails fast
        calib_text = load_text(calib_dataset, max_chars=20 * calib_nsamples * kw["seqlen"])
    prep = prepare(**_common(kw))
    if smoothing:
        ids = tokenize(prep.loaded.tokenizer, calib_text.text)
        calibration = make_windows(ids, kw["seqlen"], calib_nsamples, selection="random", seed=kw["seed"])
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = evaluate(prep.loaded, prep.windows, schemes, text=prep.text, layers=kw["layers"],
                          calibration=calibration, calibration_text=calib_text,
                          batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_eval, kw["report"])


def _show_threshold(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope threshold"))
    table = Table(title=f"Remove-kernel perplexity along {s['family']['label']} zero bound x λ "
                        f"(fp {s['fp_perplexity']:.4f}, tolerance {100 * s['tolerance']:g}%)")
    for col in ("λ", "kernel", "perplexity", "vs fp", "within"):
        table.add_column(col, justify="right")
    for r in s["curve"]:
        table.add_row(f"{r['lambda']:.4g}", pct(r["kernel_fraction"]), f"{r['perplexity']:.4f}",
                      f"{100 * (r['perplexity'] / s['fp_perplexity'] - 1):+.2f}%",
                      "yes" if r["within_tolerance"] else "no")
    out.print(table)
    b = s["bracket"]
    if s["status"] == "crossing bracketed":
        out.print(f"threshold: [bold]{pct(b['within']['kernel_fraction'])}[/] kernel stays within tolerance; "
                  f"{pct(b['beyond']['kernel_fraction'])} does not ({s['evaluations']} evaluations)")
    else:
        out.print(f"[bold]{s['status']}[/] ({s['evaluations']} evaluations)")
    if s["non_monotone_lambdas"]:
        out.print(f"[yellow]the curve is not monotone: λ = {', '.join(f'{x:.4g}' for x in s['non_monotone_lambdas'])} "
                  "contradict the bracket[/]")
    for line in s["verdicts"]:
        out.print(f"- {escape(line)}")


def run_threshold(*, tolerance, steps, family, family_bits, alpha, weight_bits, group_size, **kw) -> None:
    from kernelscope.runs.schemes import QUANTIZER_WORDS
    from kernelscope.runs.threshold import MIN_WINDOWS, threshold_search

    if not (tolerance > 0 and math.isfinite(tolerance)):
        fail(f"--tolerance must be a positive number, got {tolerance}")
    if steps < 0:
        fail(f"--steps must be at least 0, got {steps}")
    check_alphas([alpha])
    check_bits([family_bits], "--family-bits")
    _check_weights(weight_bits, group_size)
    name = QUANTIZER_WORDS.get(family.replace("_", "-"))
    if name is None:
        fail(f"unknown --family {family!r}; choose per-token, per-tensor, per-channel or crossquant")
    base = QuantizerConfig(name, family_bits, alpha if name == "crossquant" else None)
    prep = prepare(**_common(kw), min_windows=MIN_WINDOWS)
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = threshold_search(prep.loaded, prep.windows, text=prep.text, family=base, tolerance=tolerance,
                                  steps=steps, alpha=alpha, weight_bits=weight_bits, group_size=group_size,
                                  layers=kw["layers"], batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_threshold, kw["report"])


def parse_alpha_list(values: list[str]) -> list[float]:
    """``--alpha 0.15,0.45 --alpha 1`` -> [0.15, 0.45, 1.0]."""
    alphas = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                alphas.append(float(part))
            except ValueError:
                fail(f"--alpha {part.strip()!r} is not a number")
    if not alphas:
        fail("--alpha needs at least one value")
    check_alphas(alphas)
    return alphas


def _show_sweep(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope sweep"))
    table = Table(title=f"CrossQuant α sweep, W{s['weight_bits']}A{s['bits']} (α = 1 is per-token)")
    for col in ("α", "kernel (fp activations)", "kernel (in quantized pass)", "perplexity", "vs fp"):
        table.add_column(col, justify="right")
    for r in s["results"]:
        a = "fp" if r["alpha"] is None else f"{r['alpha']:g}"
        rel = "" if r["alpha"] is None else f"{100 * (r['perplexity'] / s['fp_perplexity'] - 1):+.2f}%"
        table.add_row(a, pct(r["kernel_fraction"]), pct(r["quantized_kernel_fraction"]),
                      f"{r['perplexity']:.4f}", rel)
    out.print(table)


def run_sweep(*, alpha, bits, weight_bits, group_size, **kw) -> None:
    from kernelscope.runs.sweep import alpha_sweep

    alphas = parse_alpha_list(alpha or [str(DEFAULT_ALPHA), "0.45", "0.75", "1"])
    check_bits([bits])
    check_bits([weight_bits], "--weight-bits")
    _check_weights(weight_bits, group_size)
    prep = prepare(**_common(kw))
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = alpha_sweep(prep.loaded, prep.windows, alphas, text=prep.text, bits=bits,
                             weight_bits=weight_bits, group_size=group_size, layers=kw["layers"],
                             batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_sweep, kw["report"])
