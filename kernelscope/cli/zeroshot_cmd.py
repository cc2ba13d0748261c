"""``kernelscope zeroshot``: accuracy on lm-evaluation-harness tasks under quantization schemes."""

from __future__ import annotations

import logging

from rich.markup import escape
from rich.table import Table

from kernelscope.cli.checks import (
    check_transforms_with_schemes,
    check_widths,
    scheme_options,
    transform_options,
    transform_refusals,
)
from kernelscope.cli.common import (
    check_alphas,
    check_bits,
    check_paths_and_model,
    check_positive,
    finish,
    load_with_status,
    one_value,
    read_calibration,
    refuse_unused,
    split_values,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, out, pct, show_table

DEFAULT_TASKS = ("lambada_openai", "arc_easy", "piqa", "hellaswag", "boolq")
"""The CrossQuant paper's zero-shot tasks (its Figure 1 and Table 3)."""
MAX_SEED = 2**32 - 1  # numpy's generator takes seeds below 2^32


def _schemes(scheme, alpha, bits, weight_bits, group_size, smooth_alpha):
    return scheme_options(scheme, alpha=alpha, bits=bits, weight_bits=weight_bits, group_size=group_size,
                          smooth_alpha=smooth_alpha)


def _check_numbers(*, alpha, bits, weight_bits, group_size, smooth_alpha, calib_nsamples, calib_seqlen,
                   limit, num_fewshot, batch_size, seed) -> float:
    """Every number option checked before anything loads; returns α."""
    alpha = one_value(alpha, "--alpha", float, "a number", "give one α per run")
    check_alphas([alpha])
    check_alphas([smooth_alpha], "--smooth-alpha", hint="")
    check_bits([bits])
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    if group_size is not None and group_size < 1:
        fail(f"{flag('--group-size')} must be at least 1, got {group_size}")
    for name, value in (("--calib-nsamples", calib_nsamples), ("--calib-seqlen", calib_seqlen),
                        ("--limit", limit), ("--batch-size", batch_size)):
        check_positive(name, value)
    check_positive("--num-fewshot", num_fewshot, least=0)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        fail(f"{flag('--seed')} {seed} is out of range; give a whole number from 0 to {MAX_SEED}")
    return alpha


def _refusals(schemes, transforms, given, *, output, report, batch_size, group_size, weight_bits) -> bool:
    """Refuse the options that do not apply; True when a transform needs calibration."""
    removing = any(s.mode.removes_kernel for s in schemes)
    removing_int = any(s.mode.removes_kernel and s.activation.format.grid.is_int for s in schemes)
    own = any(not s.transform.is_identity for s in schemes)  # wXaY-smoothquant
    calibrated = any(s.calibrates(t) for s in schemes for t in transforms)
    only_removal = "it applies to remove-kernel-* schemes only (a wXaY scheme names its own bit widths)"
    calibration = transform_refusals(transforms, calibrated)
    refuse_unused(
        given, **calibration,
        calib_seqlen=calibration["calib_nsamples"],
        alpha=None if any(s.activation and s.activation.takes_alpha for s in schemes)
        else "it is CrossQuant's exponent, and no --scheme given is a *-crossquant scheme",
        bits=None if removing_int else "it applies to remove-kernel-* schemes of INT quantizers only "
        "(a wXaY scheme names its own widths, a float format carries its own)",
        weight_bits=None if removing else only_removal, group_size=None if removing else only_removal,
        smooth_alpha=None if own else "it applies to the w8a8-smoothquant scheme only (give --transform "
        "smoothquant:α for the others)",
        overwrite=None if output is not None or report is not None
        else "it lets --output or --report replace an earlier result, and neither is given",
    )
    if group_size is not None and weight_bits is None:
        fail(f"{flag('--group-size')} applies to quantized weights; give --weight-bits too")
    from kernelscope.runs.zeroshot import spans_tokens

    wide = next((s for s in schemes if spans_tokens(s)), None)
    if batch_size > 1 and wide is not None:
        fail(f"{flag('--batch-size')} {batch_size} with {flag('--scheme')} {wide.name}: the harness pads the "
             "shorter requests of a batch, and this scheme takes its scale over a whole sequence, padding "
             "included; give --batch-size 1")
    return calibrated


def _calibration(loaded, text, nsamples: int, seqlen: int, seed: int | None):
    from kernelscope.data import make_windows, tokenize

    limit = loaded.info.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        fail(f"{flag('--calib-seqlen')} {seqlen} is beyond the model's context of {limit} tokens")
    return make_windows(tokenize(loaded.tokenizer, text.text), seqlen, nsamples, selection="random",
                        seed=0 if seed is None else seed,
                        names=(f"calibration text ({flag('--calib-dataset')})", flag("--calib-nsamples"),
                               flag("--calib-seqlen")))


def _check_fixed_shots(fixed: list[str], num_fewshot: int | None) -> None:
    """Refuse a few-shot count for tasks whose definitions fix it at 0, naming every one of them."""
    if num_fewshot in (None, 0) or not fixed:
        return
    whose = "their definitions fix" if len(fixed) > 1 else "its definition fixes"
    fail(f"{flag('--num-fewshot')} {num_fewshot} has no effect on task{'s' * (len(fixed) > 1)} "
         f"{', '.join(fixed)}: {whose} the few-shot count at 0, which the harness keeps")


def run_zeroshot(*, scheme, tasks, include_path, limit, num_fewshot, batch_size, seed, calib_dataset,
                 calib_nsamples, calib_seqlen, given, **kw) -> None:
    from kernelscope.data.tasks import load_tasks, require_harness
    from kernelscope.runs.zeroshot import zeroshot

    require_harness()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on a model passed as an object
    alpha = _check_numbers(alpha=kw["alpha"], bits=kw["bits"], weight_bits=kw["weight_bits"],
                           group_size=kw["group_size"], smooth_alpha=kw["smooth_alpha"],
                           calib_nsamples=calib_nsamples, calib_seqlen=calib_seqlen, limit=limit,
                           num_fewshot=num_fewshot, batch_size=batch_size, seed=seed)
    schemes = _schemes(scheme, alpha, kw["bits"], kw["weight_bits"], kw["group_size"], kw["smooth_alpha"])
    transforms = transform_options(kw["transform"], kw["transform_seed"])
    check_transforms_with_schemes(schemes, transforms)
    calibrated = _refusals(schemes, transforms, given, output=kw["output"], report=kw["report"],
                           batch_size=batch_size, group_size=kw["group_size"], weight_bits=kw["weight_bits"])
    device = check_paths_and_model(kw["model"], kw["output"], kw["overwrite"], kw["report"], kw["dtype"],
                                   kw["device"], kw["layers"])
    names = split_values(tasks, "--tasks", str, "a task name") if tasks else list(DEFAULT_TASKS)
    silent = kw["quiet"] or kw["as_json"]
    with stage_progress(silent, unit="tasks") as display:
        display.stage(f"finding the tasks and reading their documents ({', '.join(names)})")
        harness_tasks = load_tasks(names, include_path, option=flag("--tasks"),
                                   path_option=flag("--include-path"))
        _check_fixed_shots(harness_tasks.fixed_zero_shot, num_fewshot)
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, calib_seqlen)
        loaded = load_with_status(kw["model"], kw["dtype"], device, kw["trust_remote_code"], quiet=silent,
                                  display=display)
        check_widths(transforms, loaded.model, kw["layers"])
        calibration = (_calibration(loaded, calib_text, calib_nsamples, calib_seqlen, seed) if calibrated
                       else None)
        display.plan("scoring", len(schemes) * len(transforms), len(harness_tasks.tasks))
        result = zeroshot(loaded, harness_tasks, schemes, layers=kw["layers"], limit=limit,
                          num_fewshot=num_fewshot, batch_size=batch_size, seed=seed,
                          transforms=list(transforms), calibration=calibration, calibration_text=calib_text,
                          progress=display)
    finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show, kw["report"])


def _header(summary: dict):
    from rich.panel import Panel

    m = summary["model"]
    tasks = ", ".join(f"{t['task']} ({t['documents']:,} documents)" for t in summary["tasks"])
    lines = [
        (f"[bold]model[/]    {escape(str(m.get('path', m.get('architecture'))))}  ({m.get('architecture')}, "
         f"{m.get('parameters', 0) / 1e6:.0f}M parameters, {m.get('dtype')}, {m.get('device')})"),
        f"[bold]tasks[/]    {escape(tasks)}",
        f"[bold]protocol[/] {escape(summary['protocol'])}",
    ]
    return Panel("\n".join(lines), title="kernelscope zeroshot", expand=False)


def _show(result) -> None:
    s = result.summary
    out.print(_header(s))
    table = Table(title="Zero-shot accuracy in % ± standard error, change from fp in points (lm_head in "
                        "full precision; INT weights per-channel unless gN)")
    table.add_column("scheme", overflow="fold")
    table.add_column("task", overflow="fold")
    table.add_column("metric", no_wrap=True)
    for col in ("accuracy", "vs fp", "items", "kernel"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in s["results"]:
        task = r["task"] if r["filter"] == "none" else f"{r['task']} ({r['filter']})"
        stderr = "" if r["stderr"] is None else f" ± {100 * r['stderr']:.2f}"
        table.add_row(escape(r["scheme"]), escape(task), r["metric"], f"{100 * r['accuracy']:.2f}{stderr}",
                      "" if r["change_from_fp"] is None else f"{100 * r['change_from_fp']:+.2f}",
                      str(r["items"]), pct(r["kernel_fraction"]))
    show_table(table)
