"""``kernelscope advise``: which Linear layers to keep in full precision, measured, with exports."""

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
    one_alpha,
    option_refusals,
    prepare_options,
    read_calibration_text,
    transform_options,
    transform_refusals,
)
from kernelscope.cli.common import (
    check_alphas,
    check_bits,
    check_positive,
    finish,
    header,
    one_value,
    prepare,
    refuse_unused,
    split_values,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, interval, out, pct, show_table, with_ci

KERNEL_KINDS = {"module-type": "module_type", "block": "block", "layer": "layer"}
SHOWN_PER_KIND = 10


def _kernel_kinds(values: list[str] | None, per_layer: bool) -> list[str]:
    if not values:
        return ["module_type"]
    words = [w.lower() for w in split_values(values, "--kernel-groups", str, "a kind of group")]
    if words == ["none"]:
        return []
    if "none" in words:
        fail(f"{flag('--kernel-groups')} {','.join(words)}: none measures no kernel and stands alone; give "
             "it alone, or only kinds of group")
    for w in words:
        if w not in KERNEL_KINDS:
            fail(f"{flag('--kernel-groups')} {w!r} is not a kind of group; choose module-type, block, layer "
                 "(comma-separated) or none")
    if "layer" in words and not per_layer:
        fail(f"{flag('--kernel-groups')} layer needs --per-layer (layers are measured only with it)")
    return list(dict.fromkeys(KERNEL_KINDS[w] for w in words))


def _check_tolerance(tolerance: float) -> None:
    if not (tolerance > 0 and math.isfinite(tolerance)):
        fail(f"{flag('--tolerance')} must be a positive number, got {tolerance:g}")
    if tolerance > MAX_TOLERANCE:
        fail(f"{flag('--tolerance')} {tolerance:g} is beyond {MAX_TOLERANCE:g} (a {100 * MAX_TOLERANCE:g}% "
             "perplexity increase); it is a relative increase: 0.01 is 1%")


def run_advise(*, scheme, tolerance, budget, per_layer, kernel_groups, alpha, bits, weight_bits, group_size,
               smooth_alpha, transform, transform_seed, calib_dataset, calib_nsamples, given, **kw) -> None:
    from kernelscope.runs.advise import advise
    from kernelscope.runs.schemes import parse_scheme
    from kernelscope.runs.threshold import MIN_WINDOWS

    name = one_value(scheme, "--scheme", str, "a scheme", "advise plans for one scheme at a time")
    alpha = one_alpha(alpha)
    check_alphas([smooth_alpha], "--smooth-alpha", hint="")
    check_bits([bits])
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    check_positive("--calib-nsamples", calib_nsamples)
    target = parse_scheme(name, alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                          smooth_alpha=smooth_alpha)
    if target.activation is None:
        fail(f"{flag('--scheme')} {name} quantizes nothing, so no layer needs keeping; give the scheme to "
             "deploy, e.g. w8a8-per-token, fp8 or nvfp4")
    _check_tolerance(tolerance)
    if budget is not None and not 0 < budget <= 1:
        fail(f"{flag('--budget')} {budget:g} is out of range; give the share of Linear parameters allowed in "
             "full precision, in (0, 1] (0.05 is 5%)")
    kinds = _kernel_kinds(kernel_groups, per_layer)
    removing = target.mode.removes_kernel
    only_removal = "it applies to a remove-kernel-* --scheme only (a wXaY scheme names its own bit widths)"
    transforms = transform_options([transform] if transform else None, transform_seed)
    check_transforms_with_schemes([target], transforms)
    basis = next(iter(transforms))
    smoothing = target.transform.then(basis).needs_calibration
    refuse_unused(given, **option_refusals(kw, seed_applies=smoothing),
                  **transform_refusals(transforms, smoothing),
                  alpha=None if target.activation.takes_alpha
                  else "it is CrossQuant's exponent, and --scheme is not a *-crossquant scheme",
                  bits=None if removing and target.activation.format.grid.is_int else
                  "it applies to a remove-kernel-* --scheme of an INT quantizer only",
                  weight_bits=None if removing else only_removal,
                  group_size=None if removing else only_removal,
                  smooth_alpha=None if not target.transform.is_identity else "it applies to --scheme "
                  "w8a8-smoothquant only (give --transform smoothquant:α for the others)")
    check_weights(weight_bits, group_size)
    calib_text = read_calibration_text(calib_dataset, calib_nsamples, kw["seqlen"]) if smoothing else None
    prep = prepare(**prepare_options(kw), min_windows=MIN_WINDOWS)
    check_widths(transforms, prep.loaded.model, kw["layers"])
    calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if smoothing else None
    groups = ["module_type", "block", *(["layer"] if per_layer else [])]
    with stage_progress(kw["quiet"] or kw["as_json"]) as update:
        result = advise(prep.loaded, prep.windows, target, text=prep.text, tolerance=tolerance, budget=budget,
                        layers=kw["layers"], groups=groups, kernel_groups=kinds, transform=basis,
                        calibration=calibration,
                        calibration_text=calib_text, batch_size=kw["batch_size"], progress=update)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show)
    if kw["output"] is None and not kw["as_json"]:
        out.print("[dim]give -o DIR to write the plan (summary.json), its tables and the exports for "
                  "llm-compressor and ModelOpt[/]")


def _change(r: dict, prefix: str = "", *, lines: bool = False) -> str:
    """A paired change from fp and its interval (on two lines with ``lines``); one the interval does
    not separate from 0 is called that."""
    c = r.get(prefix + "change_pct")
    if c is None:
        return ""
    lo, hi = r.get(prefix + "change_pct_ci_low"), r.get(prefix + "change_pct_ci_high")
    text = f"{c:+.2f}%{chr(10) if lines else ' '}{interval(lo, hi, lambda x: f'{x:+.2f}')}".strip()
    verdict = r.get(prefix + "vs_fp") or ""
    if verdict.startswith("not separable"):
        text += "\n[yellow]not separable[/]"
    elif verdict.startswith("better"):
        text += "\n[green]better than fp[/]"
    return text


def _share(share: float | None, low: float | None = None, high: float | None = None) -> str:
    if share is None:
        return ""
    ci = f"\n[{100 * low:.0f}, {100 * high:.0f}]" if low is not None and high is not None else ""
    return f"{100 * share:.0f}%{ci}"


def _sensitivity_table(s: dict) -> Table:
    table = Table(title=f"Sensitivity to {escape(s['scheme']['scheme'])}: only the group quantized, or only "
                        "its kernel removed (paired 95% CI vs fp)", show_lines=True)
    table.add_column("group (rank)", min_width=16, overflow="fold")  # a long group name folds
    for col in ("Δ perplexity\nquantized", "KL\n(nats)", "Δ perplexity\nkernel alone", "kernel's\nshare"):
        table.add_column(col, justify="right", no_wrap=True)
    for kind in ("module_type", "block", "layer"):
        rows = sorted((r for r in s["sensitivity"] if r["group_kind"] == kind), key=lambda r: r["rank"])
        for r in rows[:SHOWN_PER_KIND if kind != "module_type" else None]:
            name = (f"{escape(r['group'])} ({r['rank']})\n"
                    f"[dim]{r['layer_count']} layers, {pct(r['parameter_share'], 1)}[/]")
            table.add_row(name, _change(r, lines=True), f"{r['kl']:.1e}", _change(r, "kernel_", lines=True),
                          _share(r["kernel_share"], r["kernel_share_ci_low"], r["kernel_share_ci_high"]))
        if len(rows) > SHOWN_PER_KIND and kind != "module_type":
            table.add_row(f"[dim]{len(rows) - SHOWN_PER_KIND} more {kind}s in the sensitivity table[/]",
                          "", "", "", "")
    return table


def _show(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope advise"))
    show_table(_sensitivity_table(s))
    fp, q, k, ke = s["fp"], s["quantized"], s["kernel"], s["kernel_explains"]
    out.print(f"fp {with_ci(fp).replace(chr(10), ' ')}; "
              f"{escape(q['scheme'])} {with_ci(q).replace(chr(10), ' ')} "
              f"{_change(q).replace(chr(10), ' ')}; its kernel alone {_change(k).replace(chr(10), ' ')}")
    if ke["share"] is not None:
        out.print("the kernel explains "
                  f"[bold]{_share(ke['share'], ke['ci_low'], ke['ci_high']).replace(chr(10), ' ')}[/] "
                  "of the scheme's loss (remove-kernel loss / full quantization loss, log perplexity)")
    else:
        out.print(f"the kernel's share of the loss is {escape(ke['note'])}")
    _show_plan(s)


def _show_plan(s: dict) -> None:
    p = s["plan"]
    bound = (f"within a budget of {100 * s['budget']:g}% of the parameters" if s["budget"] is not None
             else f"the fewest to stay within {100 * s['tolerance']:g}% of fp")
    out.print(f"\n[bold]plan[/] ({bound}): keep [bold]{p['kept_layers']}[/] "
              f"of {p['kept_layers'] + p['quantized_layers']} "
              f"Linear layers in full precision ({pct(p['parameter_share'])} of their parameters)")
    for cell in p["kept_cells"][:12]:
        out.print(f"  {escape(cell)}")
    if len(p["kept_cells"]) > 12:
        out.print(f"  ... and {len(p['kept_cells']) - 12} more cells (modules.txt)")
    verdict = "within" if p["within_tolerance"] else "[red]not within[/]"
    out.print(f"plan perplexity [bold]{p['perplexity']:.4f}[/] "
              f"{interval(p['perplexity_ci_low'], p['perplexity_ci_high'])}, "
              f"{_change(p).replace(chr(10), ' ')} vs fp: {verdict} the {100 * s['tolerance']:g}% tolerance "
              "(measured on its own pass over the same windows)")
    out.print(f"cost: {s['forward_passes']:.1f} forward passes (full-pass equivalents; {s['runs']} runs, "
              f"{s['groups']['count']} groups + 3 = {s['pass_budget']}) in {s['seconds']:.0f} s")
    e = s["exports"]
    if e["recipe"]:
        how = f"scheme {e['recipe_scheme']}" if e["recipe_scheme"] else "explicit config_groups"
        out.print(f"exports: {e['recipe']} (llm-compressor, {how}), {e['modelopt']}, {e['modules']}")
    else:
        out.print(f"exports: {e['modelopt']}, {e['modules']}; no recipe.yaml: {escape(e['recipe_note'])}")
    for note in e["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
