"""``kernelscope advise``: which Linear layers to keep in full precision, measured, with exports."""

from __future__ import annotations

import math
from pathlib import Path

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
    split_values,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, interval, out, pct, show_table, with_ci
from kernelscope.results.decision_rules import NONE as NOT_DEPLOYABLE

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


SHARED_WITH_EVAL = ("alpha", "bits", "weight_bits", "group_size", "smooth_alpha", "transform",
                    "transform_seed", "calib_dataset", "calib_nsamples", "layers", "batch_size", "dtype",
                    "device", "device_map", "max_memory", "offload_folder")
"""The options advise and eval share, with the same meaning and the same rule for when they apply."""


def _next_step(summary: dict, scheme: str, given: frozenset[str], typed: dict) -> None:
    """What to do with the plan: write it (without -o), or measure it again with eval."""
    if typed["output"] is None:
        out.print("[dim]give -o DIR to write the plan (summary.json), its tables and the exports for "
                  "llm-compressor and ModelOpt[/]")
        return
    again = _measure_again(summary, scheme, Path(typed["output"]), given, typed)
    out.print(f"measure the plan again, on the same text and windows: {escape(again)}", soft_wrap=True)


def _measure_again(summary: dict, scheme: str, output: Path, given: frozenset[str], typed: dict) -> str:
    """The eval command that measures the plan again: the run's model, text and windows, fp and the
    scheme, every shared option the user gave (as typed), and the plan's folder as --ignore."""
    from kernelscope.reports.html import rerun_command

    extra = ["--scheme", f"fp,{scheme}"]
    for name in SHARED_WITH_EVAL:
        if name in given and typed.get(name) is not None:
            chosen = summary["transform"] if name == "transform" and summary.get("candidates") else None
            extra += [flag(name), str(chosen or typed[name])]
    if "seed" in given and (summary.get("windows") or {}).get("selection") != "random":
        extra += [flag("seed"), str(typed["seed"])]  # it seeded the calibration windows
    if typed.get("trust_remote_code"):
        extra.append("--trust-remote-code")
    return rerun_command(summary, "eval", *extra, "--ignore", f"@{output}")


def _holdout_windows(holdout: int | None, kw: dict, least: int) -> int:
    """How many held-out windows to add to the --nsamples the plan is chosen on (0: none); ``kw``'s
    nsamples becomes the total to cut from the text."""
    from kernelscope.cli.common import parse_nsamples

    chosen = parse_nsamples(kw["nsamples"])
    if holdout is None:
        holdout = chosen or 0
    if holdout < 0:
        fail(f"{flag('--holdout')} {holdout} is negative; give a number of windows, or 0 for none")
    if holdout and chosen is None:
        fail(f"{flag('--holdout')} needs a number of --nsamples windows to follow (not all); give -n N, or "
             "--holdout 0")
    if holdout and chosen < least:
        fail(f"{flag('--nsamples')} {chosen} is too few windows to choose a plan on; give at least {least}")
    if holdout:
        kw["nsamples"] = chosen + holdout
    return holdout


def _schemes(scheme: str, alpha: float, bits: int, weight_bits, group_size, smooth_alpha) -> list:
    """``--scheme``: one scheme, or several (comma-separated) to rank as deploy candidates; each must
    quantize activations, which is what advise weighs."""
    from kernelscope.cli.checks import scheme_options

    schemes = scheme_options([scheme], alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                             smooth_alpha=smooth_alpha)
    for s in schemes:
        if not s.changes_activation:
            fail(f"{flag('--scheme')} {s.name} quantizes no activation, so it has no kernel for advise to "
                 "weigh; give a scheme that quantizes activations, e.g. w8a8-per-token, llm-compressor:W8A8 "
                 "or nvfp4")
    return schemes


def _refusals(schemes: list, transforms: dict, calibrated: bool, kw: dict) -> dict:
    """The options that apply to none of ``schemes`` and why."""
    removing = any(s.mode.removes_kernel for s in schemes)
    int_kernel = any(s.mode.removes_kernel and s.activation is not None and s.activation.format.grid.is_int
                     for s in schemes)
    only_removal = "it applies to a remove-kernel-* --scheme only (a wXaY scheme names its own bit widths)"
    return dict(**option_refusals(kw, seed_applies=calibrated), **transform_refusals(transforms, calibrated),
                alpha=None if any(s.activation is not None and s.activation.takes_alpha for s in schemes)
                else "it is CrossQuant's exponent, and no --scheme is a *-crossquant scheme",
                bits=None if int_kernel
                else "it applies to a remove-kernel-* --scheme of an INT quantizer only",
                weight_bits=None if removing else only_removal, group_size=None if removing else only_removal,
                smooth_alpha=None if any(not s.transform.is_identity for s in schemes) else "it applies to "
                "--scheme w8a8-smoothquant only (give --transform smoothquant:α for the others)")


def run_advise(*, scheme, tolerance, budget, per_layer, kernel_groups, alpha, bits, weight_bits, group_size,
               smooth_alpha, transform, transform_seed, calib_dataset, calib_nsamples, holdout, given,
               **kw) -> None:
    from kernelscope.runs.advise import advise
    from kernelscope.runs.candidates import advise_candidates
    from kernelscope.runs.threshold import MIN_WINDOWS

    alpha = one_alpha(alpha)
    check_alphas([smooth_alpha], "--smooth-alpha", hint="")
    check_bits([bits])
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    check_positive("--calib-nsamples", calib_nsamples)
    schemes = _schemes(scheme, alpha, bits, weight_bits, group_size, smooth_alpha)
    _check_tolerance(tolerance)
    if budget is not None and not 0 < budget <= 1:
        fail(f"{flag('--budget')} {budget:g} is out of range; give the share of Linear parameters allowed in "
             "full precision, in (0, 1] (0.05 is 5%)")
    kinds = _kernel_kinds(kernel_groups, per_layer)
    transforms = transform_options([transform] if transform else None, transform_seed)
    check_transforms_with_schemes(schemes, transforms)
    calibrated = any(s.calibrates(t) for s in schemes for t in transforms)
    refuse_unused(given, **_refusals(schemes, transforms, calibrated, kw))
    check_weights(weight_bits, group_size)
    groups = ["module_type", "block", *(["layer"] if per_layer else [])]
    holdout = _holdout_windows(holdout, kw, MIN_WINDOWS)
    with stage_progress(kw["quiet"] or kw["as_json"]) as display:
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
        prep = prepare(**prepare_options(kw), min_windows=MIN_WINDOWS, display=display)
        check_widths(transforms, prep.loaded.model, kw["layers"])
        calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if calibrated else None
        chosen, held = prep.windows.split(len(prep.windows) - holdout) if holdout else (prep.windows, None)
        display.plan("advising", None, len(chosen), "one a group, then the search's")
        settings = dict(text=prep.text, tolerance=tolerance, budget=budget, layers=kw["layers"],
                        groups=groups, kernel_groups=kinds, calibration=calibration,
                        calibration_text=calib_text, holdout=held, batch_size=kw["batch_size"],
                        progress=display)
        if len(schemes) * len(transforms) > 1:
            result = advise_candidates(prep.loaded, chosen, schemes, list(transforms), **settings)
        else:
            result = advise(prep.loaded, chosen, schemes[0], transform=next(iter(transforms)), **settings)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show)
    if not kw["as_json"]:
        typed = {"alpha": alpha, "bits": bits, "weight_bits": weight_bits, "group_size": group_size,
                 "smooth_alpha": smooth_alpha, "transform": transform, "transform_seed": transform_seed,
                 "calib_dataset": calib_dataset, "calib_nsamples": calib_nsamples, **kw}
        _next_step(result.summary, result.summary["scheme"]["scheme"], given, typed)


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
    if s.get("candidates"):
        _show_candidates(s)


def _show_candidates(s: dict) -> None:
    """Every candidate, the one to deploy first; the plan above is the first's."""
    rows = s["candidates"]
    held = "held out" if rows[0]["held_out"] else "selection windows"
    table = Table(title=f"Deploy candidates, ranked ({held}; {100 * s['tolerance']:g}% tolerance)",
                  show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("scheme · transform", min_width=18, overflow="fold")
    for col in ("deploy", "kept", "bits/\nweight", "vs fp, paired\n95% CI"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        within = "" if r["within_tolerance"] else "\n[red]beyond tolerance[/]"
        kept = f"{r['kept_layers']}\n{pct(r['parameter_share_kept'], 1)}"
        table.add_row(str(r["rank"]), f"{escape(r['scheme'])} · {escape(r['transform'])}", r["deployable"],
                      kept, f"{r['bits_per_weight']:.2f}", _change(r, lines=True) + within)
    show_table(table)
    best = rows[0]
    if best["deployable"] == NOT_DEPLOYABLE:
        out.print("[yellow]no candidate can be deployed as measured[/]: every one is a diagnostic")
    else:
        out.print(f"deploy [bold]{escape(best['scheme'])}[/] ({escape(best['transform'])}): "
                  f"{escape(best['deploy_with'])}")
    out.print(f"[dim]ranked by: {escape(s['candidates_ranking'])}[/]")


def _show_holdout(h: dict, tolerance: float) -> None:
    """The plan measured again on windows it was not chosen on: the figure to trust."""
    plan, goal = h["plan"], f"{100 * tolerance:g}%"
    if h["within_tolerance_by_interval"]:
        verdict = f"[green]holds[/] the {goal} tolerance, its whole interval within it"
    elif h["within_tolerance"]:
        verdict = (f"[yellow]holds the {goal} tolerance by its point estimate only[/]: the upper end of its "
                   "interval is beyond it")
    else:
        verdict = f"[red]fails[/] the {goal} tolerance on these windows: choose on more windows (-n)"
    out.print(f"[bold]held out[/] ({h['windows']['windows']} windows the plan was not chosen on): plan "
              f"{plan['perplexity']:.4f}, {_change(plan).replace(chr(10), ' ')} vs fp "
              f"{h['fp']['perplexity']:.4f}; the scheme alone {_change(h['quantized']).replace(chr(10), ' ')}"
              f"; the plan {verdict}")


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
    from kernelscope.reports.html import point_estimate_only

    only = point_estimate_only(p, s["tolerance"])
    verdict = (f"within the {100 * s['tolerance']:g}% tolerance" if p["within_tolerance"]
               else f"[red]not within[/] the {100 * s['tolerance']:g}% tolerance")
    out.print(f"plan perplexity [bold]{p['perplexity']:.4f}[/] "
              f"{interval(p['perplexity_ci_low'], p['perplexity_ci_high'])}, "
              f"{_change(p).replace(chr(10), ' ')} vs fp (measured on its own pass over the same windows): "
              + (verdict if only is None else f"[yellow]{escape(only)}[/]"))
    if p.get("holdout"):
        _show_holdout(p["holdout"], s["tolerance"])
    out.print(f"cost: {s['forward_passes']:.1f} forward passes (full-pass equivalents; {s['runs']} runs, "
              f"{s['groups']['count']} groups + 3 = {s['pass_budget']}) in {s['seconds']:.0f} s")
    e = s["exports"]
    out.print("exports: " + ", ".join(f for f in (e["recipe"], e["modelopt"], e["modules"]) if f))
    for name, note in (("recipe.yaml", e["recipe_note"]), ("modelopt_quant_cfg.yaml", e["modelopt_note"])):
        if note:
            out.print(f"no {name}: {escape(note)}")
    for note in e["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")
