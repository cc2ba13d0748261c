"""``kernelscope eval``, ``threshold`` and ``sweep``: perplexity under quantization schemes."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from kernelscope.cli.common import (
    check_alphas,
    check_bits,
    check_positive,
    common_refusals,
    finish,
    header,
    one_value,
    prepare,
    refuse_unused,
    split_values,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, out, pct
from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig
from kernelscope.quant.formats import FORMATS

DEFAULT_SCHEMES = ("fp", "w8a8-per-token", "w8a8-crossquant")


PERPLEXITY_MIN_SEQLEN = 2  # a window's first token is never predicted


def _common(kw: dict, **extra) -> dict:
    keys = ("model", "dataset", "nsamples", "seqlen", "windows", "seed", "layers", "batch_size", "dtype",
            "device", "trust_remote_code", "output", "overwrite", "report", "device_map", "max_memory",
            "offload_folder")
    quiet = kw["quiet"] or kw["as_json"]
    return {k: kw[k] for k in keys} | {"quiet": quiet, "min_seqlen": PERPLEXITY_MIN_SEQLEN} | extra


def _refusals(kw: dict, seed_applies: bool = False) -> dict[str, str | None]:
    return common_refusals(windows=kw["windows"], output=kw["output"], report=kw["report"],
                           device_map=kw["device_map"], seed_applies=seed_applies)


def _one_alpha(alpha: str) -> float:
    value = one_value(alpha, "--alpha", float, "a number",
                      f"`kernelscope sweep MODEL --alpha {alpha}` compares several α")
    check_alphas([value])
    return value


def _check_weights(weight_bits, group_size) -> None:
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    if group_size is not None and group_size < 1:
        fail(f"{flag('--group-size')} must be at least 1, got {group_size}")
    if group_size is not None and weight_bits is None:
        fail(f"{flag('--group-size')} applies to quantized weights; give --weight-bits too")


def _transforms(values: list[str] | None, seed: int | None) -> dict:
    """``--transform`` values (repeated or comma-separated; default none), each with ``--transform-seed``:
    the parsed transforms, in order, each mapped to the value as typed (for later errors)."""
    from kernelscope.quant.transforms import NONE, parse_transform

    specs: dict = {}
    for part in (p.strip() for v in (values or [NONE]) for p in v.split(",")):
        if not part:
            continue
        try:
            spec = parse_transform(part).with_seed(seed)
        except ValueError as exc:
            fail(f"{flag('--transform')} {part!r}: {exc}")
        if spec in specs:
            fail(f"{flag('--transform')} {part} is given twice (as {specs[spec]})")
        specs[spec] = part
    if not specs:
        fail(f"{flag('--transform')} needs at least one value (none for the identity)")
    return specs


def _check_transforms_with_schemes(schemes, transforms: dict) -> None:
    """Refuse a transform that a scheme's own transform already applies (w8a8-smoothquant with
    --transform smoothquant)."""
    for s in schemes:
        for t in transforms:
            try:
                s.transform.then(t)
            except ValueError as exc:
                fail(f"{flag('--scheme')} {s.name} with {flag('--transform')} {transforms[t]}: {exc}; "
                     f"give the scheme without its own transform (w8a8-per-token for w8a8-smoothquant) instead")


def _transform_refusals(specs, calibrated: bool) -> dict[str, str | None]:
    """When ``--transform-seed`` and the calibration options have no effect."""
    from kernelscope.quant.transforms import TRANSFORMS

    seeded = ", ".join(e.name for e in TRANSFORMS.values() if e.seeded)
    calibrated_names = ", ".join(e.name for e in TRANSFORMS.values() if e.calibrated)
    no_calibration = f"it calibrates a transform ({calibrated_names}), and none given needs calibration"
    return {
        "transform_seed": None if any(s.seeded for s in specs)
        else f"it seeds the random signs of a {seeded} --transform, and none is given",
        "calib_dataset": None if calibrated else no_calibration,
        "calib_nsamples": None if calibrated else no_calibration,
    }


def _check_widths(specs: dict, model, layers: str | None) -> None:
    """Refuse a transform that cannot apply to a selected layer (a Hadamard block that does not
    divide its width), naming the value as typed and the layer."""
    from kernelscope.runs.common import resolve_layers

    selected = resolve_layers(model, layers)
    for spec, typed in specs.items():
        for layer in selected:
            try:
                spec.check(layer.in_features)
            except ValueError as exc:
                fail(f"{flag('--transform')} {typed}: layer {layer.name}: {exc}")


def _read_calibration(needed: bool, calib_dataset: str, calib_nsamples: int, seqlen: int):
    """The calibration text, read before the model loads so that a missing text fails fast."""
    if not needed:
        return None
    from kernelscope.data import load_text

    check_positive("--calib-nsamples", calib_nsamples)
    return load_text(calib_dataset, max_chars=20 * calib_nsamples * seqlen, option=flag("--calib-dataset"))


def _calibration_windows(prep, calib_text, calib_nsamples: int, seqlen: int, seed: int):
    if calib_text is None:
        return None
    from kernelscope.data import make_windows, tokenize

    ids = tokenize(prep.loaded.tokenizer, calib_text.text)
    return make_windows(ids, seqlen, calib_nsamples, selection="random", seed=seed,
                        names=(f"calibration text ({flag('--calib-dataset')})",
                               flag("--calib-nsamples"), flag("--seqlen")))


def _details(r: dict) -> str:
    """What the scheme name does not already say."""
    parts = []
    if r["mode"] == "remove_kernel":
        parts.append(f"kernel of {r['activation_format']}")
        parts.append("weights fp" if r["weight_bits"] is None else f"W{r['weight_bits']}")
    if r["mode"] == "fake_quant" and r["weight_format"] is not None:
        parts.append(f"weights and activations {r['weight_format']}")
    if r["alpha"] is not None:
        parts.append(f"α={r['alpha']:g}")
    if r.get("transform_layers"):
        parts.append(r["transform_layers"])
    if r.get("transform_seed") is not None:
        parts.append(f"signs seed {r['transform_seed']}")
    return ", ".join(parts)


def _with_transforms(rows: list[dict]) -> bool:
    """True when some row ran in a transformed basis (the table then names each row's transform)."""
    return any(r.get("transform", "none") != rows[0].get("transform", "none") or r.get("transform_layers")
               for r in rows)


def _show_eval(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope eval"))
    rows = s["results"]
    reference = next((r for r in rows if r["scheme"] == "fp"), None)
    fp = reference["perplexity"] if reference else None
    transformed = _with_transforms(rows)
    table = Table(title="Perplexity (lm_head in full precision; INT weights per-channel unless gN)")
    table.add_column("scheme", no_wrap=True)
    if transformed:
        table.add_column("transform", no_wrap=True)
    table.add_column("details", min_width=16)
    for col in ("perplexity", "vs fp", "act. kernel", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        rel = "" if fp is None or r is reference else f"{100 * (r['perplexity'] / fp - 1):+.2f}%"
        cells = [escape(r["scheme"]), *([escape(r["transform"])] if transformed else []), escape(_details(r))]
        table.add_row(*cells, f"{r['perplexity']:.4f}", rel, pct(r["kernel_fraction"]), f"{r['seconds']:.1f}")
    out.print(table)
    for r in s["results"]:
        if not r.get("finite", True):
            out.print(f"[yellow]warning:[/] {escape(r['scheme'])} produced NaN or infinite logits; "
                      "its perplexity is not a measurement")


def run_eval(*, scheme, alpha, bits, weight_bits, group_size, smooth_alpha, transform, transform_seed,
             calib_dataset, calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    alpha = _one_alpha(alpha)
    check_alphas([smooth_alpha], "--smooth-alpha", hint="")
    check_bits([bits])
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    schemes = [parse_scheme(s, alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                            smooth_alpha=smooth_alpha)
               for s in (split_values(scheme, "--scheme", str, "a scheme") if scheme else DEFAULT_SCHEMES)]
    names = [s.name for s in schemes]
    if len(set(names)) != len(names):
        fail(f"a {flag('--scheme')} is given twice")
    transforms = _transforms(transform, transform_seed)
    _check_transforms_with_schemes(schemes, transforms)
    removing = any(s.mode == "remove_kernel" for s in schemes)
    removing_int = any(s.mode == "remove_kernel" and s.activation.format.grid.is_int for s in schemes)
    own = any(not s.transform.is_identity for s in schemes)  # wXaY-smoothquant
    calibrated = any(s.transform.then(t).needs_calibration for s in schemes for t in transforms)
    only_removal = "it applies to remove-kernel-* schemes only (a wXaY scheme names its own bit widths)"
    refuse_unused(given, **_refusals(kw, seed_applies=calibrated), **_transform_refusals(transforms, calibrated),
                  alpha=None if any(s.activation and s.activation.takes_alpha for s in schemes)
                  else "it is CrossQuant's exponent, and no --scheme given is a *-crossquant scheme",
                  bits=None if removing_int
                  else "it applies to remove-kernel-* schemes of INT quantizers only "
                  "(a wXaY scheme names its own widths, a float format carries its own)",
                  weight_bits=None if removing else only_removal,
                  group_size=None if removing else only_removal,
                  smooth_alpha=None if own else "it applies to the w8a8-smoothquant scheme only "
                  "(give --transform smoothquant:α for the others)")
    _check_weights(weight_bits, group_size)
    calib_text = _read_calibration(calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
    prep = prepare(**_common(kw))
    _check_widths(transforms, prep.loaded.model, kw["layers"])
    calibration = _calibration_windows(prep, calib_text, calib_nsamples, kw["seqlen"], kw["seed"])
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = evaluate(prep.loaded, prep.windows, schemes, text=prep.text, layers=kw["layers"],
                          transforms=list(transforms), calibration=calibration, calibration_text=calib_text,
                          batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_eval, kw["report"])


def _show_threshold(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope threshold"))
    for search in s["searches"]:
        basis = "" if search["transform"] == "none" else f", in the {search['transform']} basis"
        table = Table(title=f"Remove-kernel perplexity along {s['family']['label']} zero bound x λ{basis} "
                            f"(fp {s['fp_perplexity']:.4f}, tolerance {100 * s['tolerance']:g}%)")
        for col in ("λ", "kernel", "perplexity", "vs fp", "within"):
            table.add_column(col, justify="right")
        for r in search["curve"]:
            table.add_row(f"{r['lambda']:.4g}", pct(r["kernel_fraction"]), f"{r['perplexity']:.4f}",
                          f"{100 * (r['perplexity'] / s['fp_perplexity'] - 1):+.2f}%",
                          "yes" if r["within_tolerance"] else "no")
        out.print(table)
        b = search["bracket"]
        if search["status"] == "crossing bracketed":
            out.print(f"threshold{escape(basis)}: [bold]{pct(b['within']['kernel_fraction'])}[/] kernel stays "
                      f"within tolerance; {pct(b['beyond']['kernel_fraction'])} does not "
                      f"({search['evaluations']} evaluations)")
        else:
            out.print(f"[bold]{search['status']}[/] ({search['evaluations']} evaluations)")
        if search["non_monotone_lambdas"]:
            lams = ", ".join(f"{x:.4g}" for x in search["non_monotone_lambdas"])
            out.print(f"[yellow]the curve is not monotone: λ = {lams} contradict the bracket[/]")
        for line in search["verdicts"]:
            out.print(f"- {escape(line)}")


MAX_TOLERANCE = 1.0  # a doubled perplexity is no longer "lossless" by any reading


def run_threshold(*, tolerance, steps, family, family_bits, alpha, weight_bits, group_size, transform,
                  transform_seed, calib_dataset, calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.schemes import FORMAT_WORDS
    from kernelscope.runs.threshold import MIN_WINDOWS, threshold_search

    if not (tolerance > 0 and math.isfinite(tolerance)):
        fail(f"{flag('--tolerance')} must be a positive number, got {tolerance:g}")
    if tolerance > MAX_TOLERANCE:
        fail(f"{flag('--tolerance')} {tolerance:g} is beyond {MAX_TOLERANCE:g} (a {100 * MAX_TOLERANCE:g}% "
             "perplexity increase); it is a relative increase: 0.01 is 1%")
    if steps < 0:
        fail(f"{flag('--steps')} must be at least 0, got {steps}")
    alpha = _one_alpha(alpha)
    check_bits([family_bits], "--family-bits")
    _check_weights(weight_bits, group_size)
    name = FORMAT_WORDS.get(family.strip().lower().replace("_", "-"))
    if name is None:
        fail(f"unknown {flag('--family')} {family!r}; choose {', '.join(FORMAT_WORDS)}")
    grid = FORMATS[name].grid
    transforms = _transforms(transform, transform_seed)
    calibrated = any(t.needs_calibration for t in transforms)
    refuse_unused(given, **_refusals(kw, seed_applies=calibrated), **_transform_refusals(transforms, calibrated),
                  family_bits=None if grid is None else f"--family {family} carries its own {grid.bits}-bit elements")
    base = QuantizerConfig(name, family_bits if grid is None else grid.bits,
                           alpha if FORMATS[name].takes_alpha else None)
    calib_text = _read_calibration(calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
    prep = prepare(**_common(kw), min_windows=MIN_WINDOWS)
    _check_widths(transforms, prep.loaded.model, kw["layers"])
    calibration = _calibration_windows(prep, calib_text, calib_nsamples, kw["seqlen"], kw["seed"])
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = threshold_search(prep.loaded, prep.windows, text=prep.text, family=base, tolerance=tolerance,
                                  steps=steps, alpha=alpha, weight_bits=weight_bits, group_size=group_size,
                                  layers=kw["layers"], transforms=list(transforms), calibration=calibration,
                                  calibration_text=calib_text, batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_threshold, kw["report"])


def parse_alpha_list(values: list[str]) -> list[float]:
    """``--alpha 0.15,0.45 --alpha 1`` -> [0.15, 0.45, 1.0]."""
    alphas = split_values(values, "--alpha", float, "a number")
    check_alphas(alphas)
    return alphas


def _show_sweep(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope sweep"))
    transformed = _with_transforms(s["results"])
    table = Table(title=f"CrossQuant α sweep, W{s['weight_bits']}A{s['bits']} (α = 1 is per-token)")
    for col in (*(["transform"] if transformed else []), "α", "kernel (fp activations)",
                "kernel (in quantized pass)", "perplexity", "vs fp"):
        table.add_column(col, justify="right")
    for r in s["results"]:
        a = "fp" if r["alpha"] is None else f"{r['alpha']:g}"
        rel = "" if r["alpha"] is None else f"{100 * (r['perplexity'] / s['fp_perplexity'] - 1):+.2f}%"
        table.add_row(*([escape(r["transform"])] if transformed else []), a, pct(r["kernel_fraction"]),
                      pct(r["quantized_kernel_fraction"]), f"{r['perplexity']:.4f}", rel)
    out.print(table)


def run_sweep(*, alpha, bits, weight_bits, group_size, transform, transform_seed, calib_dataset,
              calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.sweep import alpha_sweep

    alphas = parse_alpha_list(alpha or [str(DEFAULT_ALPHA), "0.45", "0.75", "1"])
    check_bits([bits])
    check_bits([weight_bits], "--weight-bits")
    _check_weights(weight_bits, group_size)
    transforms = _transforms(transform, transform_seed)
    calibrated = any(t.needs_calibration for t in transforms)
    refuse_unused(given, **_refusals(kw, seed_applies=calibrated), **_transform_refusals(transforms, calibrated))
    calib_text = _read_calibration(calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
    prep = prepare(**_common(kw))
    _check_widths(transforms, prep.loaded.model, kw["layers"])
    calibration = _calibration_windows(prep, calib_text, calib_nsamples, kw["seqlen"], kw["seed"])
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = alpha_sweep(prep.loaded, prep.windows, alphas, text=prep.text, bits=bits,
                             weight_bits=weight_bits, group_size=group_size, layers=kw["layers"],
                             transforms=list(transforms), calibration=calibration, calibration_text=calib_text,
                             batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show_sweep, kw["report"])
