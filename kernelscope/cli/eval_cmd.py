"""``kernelscope eval``, ``threshold`` and ``sweep``: perplexity under quantization schemes."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from kernelscope.cli.checks import (
    MAX_TOLERANCE,
    calibration_windows,
    check_transforms_with_schemes,
    check_weights,
    check_widths,
    ignored_names,
    one_alpha,
    option_refusals,
    prepare_options,
    quantizer_configs,
    read_ignore,
    scheme_options,
    transform_options,
    transform_refusals,
)
from kernelscope.cli.common import (
    check_alphas,
    check_bits,
    check_positive,
    finish,
    header,
    prepare,
    read_calibration,
    refuse_unused,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, interval, out, pct, show_table, versus_fp, with_ci
from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig
from kernelscope.quant.formats import FORMATS
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import NONE


def _details(r: dict) -> str:
    """What the scheme name does not already say."""
    parts = []
    if Mode(r["mode"]).removes_kernel:
        parts.append(f"kernel of {r['activation_format']}")
        parts.append("weights fp" if r["weight_bits"] is None else f"W{r['weight_bits']}")
    if r.get("arithmetic", "kernelscope") != "kernelscope":  # a deployment target: its own arithmetic
        parts.append(f"weights {r['weight_format'] or 'fp'}, activations {r['activation_format'] or 'fp'} "
                     f"({r['arithmetic']})")
    elif Mode(r["mode"]) is Mode.FAKE_QUANT and r["weight_format"] is not None:
        parts.append(f"weights and activations {r['weight_format']}")
    if r["alpha"] is not None:
        parts.append(f"α={r['alpha']:g}")
    if r.get("transform_layers"):  # the blocks each width got are in the JSON's transform_layers
        parts.append(f"in the {r['transform']} basis")
    if r.get("transform_seed") is not None:
        parts.append(f"signs seed {r['transform_seed']}")
    return ", ".join(parts)


def _with_transforms(rows: list[dict]) -> bool:
    """True when some row ran in a transformed basis (the table then names each row's transform)."""
    return any(r.get("transform", NONE) != rows[0].get("transform", NONE) or r.get("transform_layers")
               for r in rows)


def _show_eval(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope eval"))
    rows = s["results"]
    kept = s["layers"].get("full_precision") or []
    title = "Perplexity (lm_head in full precision; INT weights per-channel unless gN)"
    if kept:
        title += f"; {len(kept)} layers kept in full precision ({escape(str(s['layers']['ignore']))})"
    elif s["layers"].get("ignore"):
        out.print(f"[yellow]note:[/] {flag('--ignore')} {escape(str(s['layers']['ignore']))} keeps no layer "
                  "in full precision: every layer a scheme quantizes is quantized")
    table = Table(title=title, show_lines=True)
    # names whole; details wrap
    table.add_column("scheme", min_width=min(28, max(len(r["scheme"]) for r in rows)))
    for col in ("perplexity\n95% CI", "vs fp, paired\n95% CI", "act.\nkernel", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        details = _details(r)
        name = escape(r["scheme"]) + (f"\n[dim]{escape(details)}[/]" if details else "")
        table.add_row(name, with_ci(r), versus_fp(r), pct(r["kernel_fraction"]), f"{r['seconds']:.1f}")
    show_table(table)
    if any((r.get("vs_fp") or "").startswith("not separable") for r in rows):
        out.print("[dim]not separable: the interval of the change contains 0, so these windows do not tell "
                  "it from fp[/]")
    out.print(f"[dim]intervals: {escape(s['uncertainty'])}[/]")
    for r in rows:
        if not r.get("finite", True):
            out.print(f"[yellow]warning:[/] {escape(r['scheme'])} produced NaN or infinite logits; "
                      "its perplexity is not a measurement")
    if s.get("sqnr"):
        _show_sqnr(s["sqnr"])


def _decibels(value: float | None, applies: bool) -> str:
    """An SQNR cell: dB, ``exact`` for no error at all, ``—`` for a part the scheme leaves alone."""
    if not applies:
        return "—"
    return "exact" if value is None else f"{value:.1f}"


def _show_sqnr(sqnr: dict) -> None:
    """Each quantizing scheme's output SQNR per module type (and over every layer), beside its kernel."""
    several = len({p["transform"] for p in sqnr["results"]}) > 1
    table = Table(title="Layer output SQNR, dB, on the full-precision model's inputs (each module type's "
                        "layers pooled, weighted by output energy)")
    table.add_column("scheme")
    table.add_column("module")
    for col in ("SQNR", "act.\nonly", "weights\nonly", "act.\nkernel"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in sqnr["results"]:
        name = escape(p["scheme"]) + (f"\n[dim]{escape(p['transform'])}[/]" if several else "")
        groups = [*p["by_module_type"], {**p, "module_type": f"all {p['layers']} layers"}]
        for i, g in enumerate(groups):
            table.add_row(name if i == 0 else "", escape(g["module_type"]),
                          _decibels(g["sqnr_db"], True),
                          _decibels(g["sqnr_activations_db"], p["activations"]),
                          _decibels(g["sqnr_weights_db"], p["weights"]),
                          pct(g["kernel_fraction"]) if p["activations"] else "—",
                          end_section=i == len(groups) - 1)
    show_table(table)
    out.print("[dim]SQNR = 10·log10(Σ y² / Σ (y − ŷ)²) of each layer's output y = x·Wᵀ; per layer in "
              "sqnr.parquet (--output)[/]")


def run_eval(*, scheme, alpha, bits, weight_bits, group_size, smooth_alpha, transform, transform_seed,
             calib_dataset, calib_nsamples, ignore, sqnr, given, **kw) -> None:
    from kernelscope.runs.evaluate import evaluate

    alpha = one_alpha(alpha)
    check_alphas([smooth_alpha], "--smooth-alpha", hint="")
    check_bits([bits])
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    check_positive("--calib-nsamples", calib_nsamples)
    schemes = scheme_options(scheme, alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                             smooth_alpha=smooth_alpha)
    transforms = transform_options(transform, transform_seed)
    check_transforms_with_schemes(schemes, transforms)
    quantizing = sum(s.mode.quantizes for s in schemes)
    if sqnr and not quantizing:
        fail(f"{flag('--sqnr')} measures the error of a quantizing scheme; fp quantizes nothing")
    removing = any(s.mode.removes_kernel for s in schemes)
    removing_int = any(s.mode.removes_kernel and s.activation.format.grid.is_int for s in schemes)
    own = any(not s.transform.is_identity for s in schemes)  # wXaY-smoothquant
    calibrated = any(s.calibrates(t) for s in schemes for t in transforms)
    only_removal = "it applies to remove-kernel-* schemes only (a wXaY scheme names its own bit widths)"
    refuse_unused(given, **option_refusals(kw, seed_applies=calibrated),
                  **transform_refusals(transforms, calibrated),
                  alpha=None if any(s.activation and s.activation.takes_alpha for s in schemes)
                  else "it is CrossQuant's exponent, and no --scheme given is a *-crossquant scheme",
                  bits=None if removing_int
                  else "it applies to remove-kernel-* schemes of INT quantizers only "
                  "(a wXaY scheme names its own widths, a float format carries its own)",
                  weight_bits=None if removing else only_removal,
                  group_size=None if removing else only_removal,
                  smooth_alpha=None if own else "it applies to the w8a8-smoothquant scheme only "
                  "(give --transform smoothquant:α for the others)",
                  ignore=None if any(s.mode.quantizes for s in schemes)
                  else "it keeps layers in full precision under a scheme, and fp quantizes none")
    check_weights(weight_bits, group_size)
    spec = read_ignore(ignore) if ignore is not None else None
    with stage_progress(kw["quiet"] or kw["as_json"]) as display:
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
        prep = prepare(**prepare_options(kw), display=display)
        check_widths(transforms, prep.loaded.model, kw["layers"])
        calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if calibrated else None
        names = ignored_names(spec, prep.loaded.model, kw["layers"], ignore) if spec is not None else None
        display.plan("evaluating", (len(schemes) + sqnr * quantizing) * len(transforms), len(prep.windows))
        result = evaluate(prep.loaded, prep.windows, schemes, text=prep.text, layers=kw["layers"],
                          transforms=list(transforms), calibration=calibration, calibration_text=calib_text,
                          ignore=names, ignore_source=ignore, batch_size=kw["batch_size"], progress=display,
                          sqnr=sqnr)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_eval, kw["report"])


def _show_search(s: dict, search: dict) -> None:
    """One threshold search: its curve with intervals, its bracket, its uncertainty and verdicts."""
    basis = "" if search["transform"] == NONE else f", in the {search['transform']} basis"
    table = Table(title=f"Remove-kernel perplexity along {s['family']['label']} zero bound x λ{basis} "
                        f"(fp {s['fp_perplexity']:.4f}, tolerance {100 * s['tolerance']:g}%)")
    for col in ("λ", "kernel", "perplexity", "95% CI", "vs fp", "within", "P(within)"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in search["curve"]:
        p = r["within_probability"]
        table.add_row(f"{r['lambda']:.4g}", pct(r["kernel_fraction"]), f"{r['perplexity']:.4f}",
                      interval(r["perplexity_ci_low"], r["perplexity_ci_high"]),
                      f"{100 * (r['perplexity'] / s['fp_perplexity'] - 1):+.2f}%",
                      "yes" if r["within_tolerance"] else "no", "" if p is None else f"{p:.2f}")
    show_table(table)
    b = search["bracket"]
    if search["status"] == "crossing bracketed":
        out.print(f"threshold{escape(basis)}: [bold]{pct(b['within']['kernel_fraction'])}[/] kernel stays "
                  f"within tolerance; {pct(b['beyond']['kernel_fraction'])} does not "
                  f"({search['evaluations']} evaluations)")
    else:
        out.print(f"[bold]{search['status']}[/] ({search['evaluations']} evaluations)")
    u = search["crossing_uncertainty"]
    if u is not None:
        held = "" if u["bracket_probability"] is None else "; " + _bracket_held(b, u["bracket_probability"])
        out.print(f"resampling the windows, the threshold lies in [{pct(u['kernel_fraction_ci_low'])}, "
                  f"{pct(u['kernel_fraction_ci_high'])}] (95%, on the λ grid evaluated){held}")
    if search["non_monotone_lambdas"]:
        lams = ", ".join(f"{x:.4g}" for x in search["non_monotone_lambdas"])
        out.print(f"[yellow]the curve is not monotone: λ = {lams} contradict the bracket[/]")
    for line in search["verdicts"]:
        out.print(f"- {escape(line)}")


def _bracket_held(b: dict, probability: float) -> str:
    """How often resampling the windows keeps the break where it was observed, in words."""
    share = f"in {100 * probability:.0f}% of bootstrap resamples of the windows"
    within, beyond = b.get("within"), b.get("beyond")
    low = None if within is None else pct(within["kernel_fraction"])
    high = None if beyond is None else pct(beyond["kernel_fraction"])
    if low is not None and high is not None:
        return (f"{share} the break falls between the same two measured points ({low} kernel within "
                f"tolerance, {high} beyond)")
    if low is not None:
        return f"{share} the largest kernel measured, {low}, stays within tolerance"
    return f"{share} the smallest kernel measured, {high}, stays beyond tolerance"


def _show_threshold(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope threshold"))
    for search in s["searches"]:
        _show_search(s, search)


MAX_STEPS = 20
"""Bisection steps ``threshold`` takes at most after the bracket: 2^-20 of it is far below any interval."""


def _threshold_family(family: str, family_bits: int, alpha: float):
    """``--family`` as typed -> the family searched (a format at its width, or a deployment target's
    scheme) and why ``--family-bits`` does not apply to it (None where it does)."""
    from kernelscope.runs.schemes import FORMAT_WORDS, parse_scheme

    if ":" in family:
        scheme = parse_scheme(family.strip())
        why = scheme.kernel_refusal((), "search", shown=family)  # the basis is checked with --transform
        if why is not None:
            fail(f"{flag('--family')} {why}")
        bits = scheme.target.input_activations.num_bits
        return scheme, f"--family {family} carries its own {bits}-bit elements"
    name = FORMAT_WORDS.get(family.strip().lower().replace("_", "-"))
    if name is None:
        fail(f"unknown {flag('--family')} {family!r}; choose {', '.join(FORMAT_WORDS)} or a deployment "
             "target (`kernelscope targets`)")
    grid = FORMATS[name].grid
    base = QuantizerConfig(name, family_bits if grid is None else grid.bits,
                           alpha if FORMATS[name].takes_alpha else None)
    return base, None if grid is None else f"--family {family} carries its own {grid.bits}-bit elements"


def run_threshold(*, tolerance, steps, family, family_bits, alpha, weight_bits, group_size, transform,
                  transform_seed, calib_dataset, calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.threshold import MIN_WINDOWS, threshold_search

    if not (tolerance > 0 and math.isfinite(tolerance)):
        fail(f"{flag('--tolerance')} must be a positive number, got {tolerance:g}")
    if tolerance > MAX_TOLERANCE:
        fail(f"{flag('--tolerance')} {tolerance:g} is beyond {MAX_TOLERANCE:g} (a {100 * MAX_TOLERANCE:g}% "
             "perplexity increase); it is a relative increase: 0.01 is 1%")
    if not 0 <= steps <= MAX_STEPS:
        fail(f"{flag('--steps')} must be from 0 to {MAX_STEPS}, got {steps}: each step halves the bracket, "
             f"and {MAX_STEPS} steps narrow it below a millionth")
    alpha = one_alpha(alpha)
    check_bits([family_bits], "--family-bits")
    check_weights(weight_bits, group_size)
    base, own_bits = _threshold_family(family, family_bits, alpha)
    target = None if isinstance(base, QuantizerConfig) else base
    transforms = transform_options(transform, transform_seed)
    why = target.kernel_refusal(transforms, "search") if target is not None else None
    if why is not None:
        fail(f"{flag('--family')} {why}")
    calibrated = any(t.needs_calibration for t in [*transforms, *([target] if target else [])])
    weights_kept = (f"--family {family} removes the target's activation kernel only; the weights stay in "
                    "full precision") if target else None
    refuse_unused(given, **option_refusals(kw, seed_applies=calibrated),
                  **transform_refusals(transforms, calibrated), family_bits=own_bits,
                  weight_bits=weights_kept, group_size=weights_kept)
    if calibrated:
        check_positive("--calib-nsamples", calib_nsamples)
    with stage_progress(kw["quiet"] or kw["as_json"]) as display:
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
        prep = prepare(**prepare_options(kw), min_windows=MIN_WINDOWS, display=display)
        check_widths(transforms, prep.loaded.model, kw["layers"])
        calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if calibrated else None
        display.plan("searching", None, len(prep.windows), "as many as it needs")
        result = threshold_search(prep.loaded, prep.windows, text=prep.text, family=base, tolerance=tolerance,
                                  steps=steps, alpha=alpha, weight_bits=weight_bits, group_size=group_size,
                                  layers=kw["layers"], transforms=list(transforms), calibration=calibration,
                                  calibration_text=calib_text, batch_size=kw["batch_size"], progress=display)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_threshold, kw["report"])


def _show_sweep(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope sweep"))
    rows = s["results"]
    transformed = _with_transforms(rows)
    quantizers = s["quantizers"]
    alphas_only = (all(q["alpha"] is not None for q in quantizers)
                   and len({q["bits"] for q in quantizers}) == 1)
    title = (f"CrossQuant α sweep, W{s['weight_bits']}A{quantizers[0]['bits']} (α = 1 is per-token)"
             if alphas_only
             else f"Quantizers side by side (INT weights W{s['weight_bits']}, float formats' weights in "
             "their format)")
    table = Table(title=title, show_lines=True)
    for col in (*(["transform"] if transformed else []), "α" if alphas_only else "quantizer",
                "kernel (fp activations)", "kernel (in quantized pass)", "perplexity\n95% CI",
                "vs fp, paired\n95% CI"):
        table.add_column(col, justify="right", no_wrap="\n" in col)  # numbers whole
    for r in rows:
        first = "fp" if r["quantizer"] is None else (f"{r['alpha']:g}" if alphas_only else r["quantizer"])
        table.add_row(*([escape(r["transform"])] if transformed else []), escape(first),
                      pct(r["fp_kernel_fraction"]), pct(r["kernel_fraction"]), with_ci(r), versus_fp(r))
    show_table(table)
    out.print(f"[dim]intervals: {escape(s['uncertainty'])}[/]")


def run_sweep(*, quantizer, alpha, bits, weight_bits, group_size, transform, transform_seed, calib_dataset,
              calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.sweep import sweep

    configs = quantizer_configs(quantizer or ["crossquant"], bits or ["8"],
                                alpha or [str(DEFAULT_ALPHA), "0.45", "0.75", "1"], None)
    check_bits([weight_bits], "--weight-bits")
    check_weights(weight_bits, group_size)
    transforms = transform_options(transform, transform_seed)
    calibrated = any(t.needs_calibration for t in transforms)
    some_int = any(c.format.grid.is_int for c in configs)
    float_only = "it sets the INT weights of INT quantizers, and the float formats given carry their own"
    refuse_unused(given, **option_refusals(kw, seed_applies=calibrated),
                  **transform_refusals(transforms, calibrated),
                  alpha=None if any(c.takes_alpha for c in configs)
                  else "it is CrossQuant's exponent, and no --quantizer given takes it (add -q crossquant)",
                  bits=None if some_int
                  else "it sets the width of INT quantizers, and the float formats given carry their own",
                  weight_bits=None if some_int else float_only, group_size=None if some_int else float_only)
    if calibrated:
        check_positive("--calib-nsamples", calib_nsamples)
    with stage_progress(kw["quiet"] or kw["as_json"]) as display:
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
        prep = prepare(**prepare_options(kw), display=display)
        check_widths(transforms, prep.loaded.model, kw["layers"])
        calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if calibrated else None
        display.plan("sweeping", 2 + len(configs) * len(transforms), len(prep.windows))
        result = sweep(prep.loaded, prep.windows, configs, text=prep.text, weight_bits=weight_bits,
                       group_size=group_size, layers=kw["layers"], transforms=list(transforms),
                       calibration=calibration, calibration_text=calib_text, batch_size=kw["batch_size"],
                       progress=display)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_sweep, kw["report"])
