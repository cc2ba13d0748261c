"""``kernelscope profile``: kernel statistics of every decoder Linear input, shown and saved."""

from __future__ import annotations

import polars as pl
from rich.markup import escape
from rich.table import Table

from kernelscope.cli.checks import (
    calibration_windows,
    check_widths,
    option_refusals,
    prepare_options,
    profile_configs,
    transform_options,
    transform_refusals,
)
from kernelscope.cli.common import (
    check_positive,
    finish,
    header,
    prepare,
    read_calibration,
    refuse_unused,
    split_values,
    stage_progress,
)
from kernelscope.cli.console import fail, flag, out, pct, show_table
from kernelscope.errors import Interrupted, KernelscopeError
from kernelscope.quant import MAX_BITS, MIN_BITS, QuantizerConfig
from kernelscope.quant.transforms import NONE


def _weight_formats(specs: list[str] | None, group_size: int | None):
    """``--weight-format per_token:4,nvfp4`` -> the weight quantizers; an INT one needs its bits."""
    from kernelscope.quant.formats import FORMATS
    from kernelscope.runs.weights import DEFAULT_WEIGHT_FORMAT

    if not specs:
        return [DEFAULT_WEIGHT_FORMAT]
    out = []
    for spec in split_values(specs, "--weight-format", str, "a weight format"):
        name, _, bits = spec.lower().replace("-", "_").partition(":")
        entry = FORMATS.get(name)
        if entry is None or entry.takes_alpha:
            known = ", ".join(n for n, e in FORMATS.items() if not e.takes_alpha)
            fail(f"{flag('--weight-format')} {spec!r}: unknown weight quantizer; choose {known}")
        if entry.grid is None and not bits.isdigit():
            fail(f"{flag('--weight-format')} {spec!r}: an INT weight quantizer needs its bits, e.g. {name}:4")
        if entry.grid is not None and bits:
            fail(f"{flag('--weight-format')} {spec!r}: {name} carries its own width; drop :{bits}")
        width = int(bits) if bits else entry.grid.bits
        if entry.grid is None and not MIN_BITS <= width <= MAX_BITS:
            fail(f"{flag('--weight-format')} {spec} is out of range; an INT weight quantizer takes "
                 f"{MIN_BITS} to {MAX_BITS} bits: {name}:{MIN_BITS} to {name}:{MAX_BITS}")
        block = group_size if entry.block_size is not None and entry.grid is None else None
        out.append(QuantizerConfig(name, width, None, block))
    return list(dict.fromkeys(out))


def _show(result) -> None:
    s = result.summary
    out.print(header(s, "kernelscope profile"))
    out.print(f"[bold]layers[/] {s['layers']['count']} Linear inputs, {s['tokens']:,} tokens in "
              f"{s['seconds']:.1f} s ({s['tokens_per_second']:,.0f} tokens/s)")
    level = result.model_level
    labels = level["transform"].unique(maintain_order=True).to_list()
    if len(labels) > 1:
        show_table(_side_by_side(level, labels))
    else:
        show_table(_model_table(level, labels[0]))
    shares = [(label, level.filter(pl.col("transform") == label)["c_ge_t_fraction"][0]) for label in labels]
    shown = ", ".join(f"[bold]{pct(v)}[/]" + ("" if len(labels) == 1 else f" ({escape(label)})")
                      for label, v in shares)
    out.print(f"pairs with c_j >= t_i (where CrossQuant's bound is not below per-token's): {shown}")
    show_table(_by_module_type(result.by_module_type, several=len(labels) > 1))
    if result.weights is not None:
        show_table(_weight_table(s["weights_model_level"], several=len(labels) > 1))


def _basis(label: str) -> str:
    return "" if label == NONE else f", in the {label} basis"


def _model_table(level: pl.DataFrame, label: str) -> Table:
    """One transform's model-level kernels, with the subnormal and whole-block shares that apply."""
    extras = [(c, title) for c, title in (("subnormal_fraction", "on subnormals"),
                                           ("block_kernel_fraction", "whole blocks"))
              if level[c].is_not_null().any()]
    table = Table(title="Model-level kernel (elements-weighted over all covered Linear inputs"
                        f"{escape(_basis(label))})")
    for col, justify in (("quantizer", "left"), ("kernel", "right"), ("kernel elements", "right"),
                         ("of elements", "right"), *((title, "right") for _, title in extras)):
        table.add_column(col, justify=justify, no_wrap=col in ("quantizer", "kernel"))
    for row in level.iter_rows(named=True):
        table.add_row(row["config"], pct(row["kernel_fraction"]), f"{row['kernel_elements']:,}",
                      f"{row['elements']:,}", *(pct(row[c]) for c, _ in extras))
    return table


def _side_by_side(level: pl.DataFrame, labels: list[str]) -> Table:
    """Each configuration's model-level kernel in every basis, and the change from the first."""
    table = Table(title="Model-level kernel per transform (elements-weighted over all covered Linear inputs)")
    table.add_column("quantizer")  # wraps between its words, which leaves room for a basis more
    for i, label in enumerate(labels):
        table.add_column(escape(label), justify="right")
        if i:
            table.add_column(f"{escape(label)} vs {escape(labels[0])}", justify="right")
    cell = {(r["transform"], r["config"]): r["kernel_fraction"] for r in level.iter_rows(named=True)}
    for config in level["config"].unique(maintain_order=True).to_list():
        first = cell.get((labels[0], config))
        row = [pct(first)]
        for label in labels[1:]:
            value = cell.get((label, config))
            row += [pct(value), "" if value is None or first is None else f"{100 * (value - first):+.2f} pt"]
        table.add_row(escape(config), *row)
    return table


def _weight_table(rows: list[dict], several: bool) -> Table:
    table = Table(title="Weight kernel (parameter-weighted over the covered Linear weights, each in the "
                        "basis it is deployed in)" if several
                  else "Weight kernel (parameter-weighted over the covered Linear weights)")
    cols = ["weight quantizer", *(["transform"] if several else []), "kernel", "kernel weights", "of weights"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("weight quantizer", "transform") else "right",
                         no_wrap=col == "kernel")
    for row in rows:
        table.add_row(escape(row["config"]), *([escape(row["transform"])] if several else []),
                      pct(row["kernel_fraction"]), f"{row['kernel_elements']:,}", f"{row['elements']:,}")
    return table


def _by_module_type(by_type: pl.DataFrame, several: bool = False) -> Table:
    """Kernel per module type: one column per configuration (and transform), or, past four, one row each."""
    if several:
        by_type = by_type.with_columns(pl.format("{} ({})", "config", "transform").alias("config"))
    wide = by_type.pivot(on="config", index="module_type", values="kernel_fraction", maintain_order=True)
    c_rows = (by_type.group_by("module_type", "transform", maintain_order=True)
              .agg(pl.col("c_ge_t_fraction").first()))
    c_rows = c_rows.with_columns((pl.format("c >= t ({})", "transform") if several
                                  else pl.lit("c >= t")).alias("share"))
    c_by_type = c_rows.pivot(on="share", index="module_type", values="c_ge_t_fraction", maintain_order=True)
    wide = wide.join(c_by_type, on="module_type", how="left", maintain_order="left")
    if wide.width > 6:  # many configurations: configurations as rows, module types as columns
        types = wide["module_type"].to_list()
        table = Table(title="Kernel by module type")
        table.add_column("quantizer", no_wrap=True)
        for name in types:
            table.add_column(escape(str(name)), justify="right", no_wrap=True)
        for col in wide.columns[1:]:
            table.add_row(escape(col), *(pct(v) for v in wide[col].to_list()))
        return table
    table = Table(title="Kernel by module type")
    for col in wide.columns:
        name = "module" if col == "module_type" else col
        table.add_column(escape(name), justify="left" if col == "module_type" else "right")
    for row in wide.iter_rows():
        table.add_row(escape(str(row[0])), *(pct(v) for v in row[1:]))
    return table


def _profile(prep, configs, display, *, checkpoint, **options):
    """The profile's one pass over the windows, shown on ``display``; stopped (Ctrl-C), one line on the
    checkpoint it keeps, where it keeps one."""
    from kernelscope.runs import profile

    done = [0]

    def step(count: int, total: int) -> None:
        done[0] = count
        display("profiling", count, total)

    try:
        return profile(prep.loaded, prep.windows, configs, text=prep.text, progress=step,
                       checkpoint=checkpoint, **options)
    except KeyboardInterrupt:
        if checkpoint is not None and checkpoint.is_file():
            raise Interrupted(f"stopped after {done[0]} of {len(prep.windows)} windows; a checkpoint "
                              f"is kept at {checkpoint}: rerun the same command with --resume") from None
        raise


def _checkpoint(output, resume: bool, parallel: bool):
    """Where a run keeps its checkpoint (beside ``--output``; None without one, or under torchrun), checked
    for ``--resume``, and refused where something of the user's lies there."""
    from kernelscope.runs.checkpoint import checkpoint_path, is_checkpoint

    if parallel and resume:
        fail("--resume works in a single process only; rerun without torchrun to resume")
    if resume and output is None:
        fail("--resume needs --output: the checkpoint is kept beside the output folder")
    checkpoint = checkpoint_path(output) if output is not None and not parallel else None
    if resume and not checkpoint.is_file():
        fail(f"nothing to resume: no checkpoint at {checkpoint}")
    if not resume and checkpoint is not None and checkpoint.exists() and not is_checkpoint(checkpoint):
        fail(f"{checkpoint}, where this run would keep its checkpoint, exists and was not written by "
             f"kernelscope; move it or choose another {flag('--output')}")
    return checkpoint


def _world(device: str, device_map: str | None):
    """Under torchrun: this process's device (one GPU each, ``cuda:LOCAL_RANK``; CPU processes share the
    machine's cores) and its place among the processes, once it has joined them."""
    import os

    import torch

    from kernelscope.runs import distributed

    if device in ("auto", "cuda") and torch.cuda.is_available() and device_map is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device, distributed.start(torch.device("cuda" if device.startswith("cuda") else "cpu"))


def _quantizers(given, *, quantizer, bits, alpha, group_size, weight_format, transform, transform_seed,
                calib_nsamples, **kw):
    """``-q``/``-b``/``-a``, the weight formats and the transforms as typed -> what the profile counts,
    refused where an option given has no effect; and whether a calibration pass is needed."""
    configs, targets = profile_configs(quantizer, bits, alpha, group_size)
    weights = _weight_formats(weight_format, group_size)
    transforms = transform_options(transform, transform_seed)
    why = next(filter(None, (t.kernel_refusal(transforms, "profile") for t in targets)), None)
    if why is not None:
        fail(f"{flag('--quantizer')} {why}")
    calibrated = any(t.needs_calibration for t in [*transforms, *targets])
    check_positive("--calib-nsamples", calib_nsamples)
    refuse_unused(given, **option_refusals(kw, seed_applies=calibrated),
                  **transform_refusals(transforms, calibrated),
                  alpha=None if any(c.takes_alpha for c in configs)
                  else "it is CrossQuant's exponent, and no --quantizer given takes it (add -q crossquant)",
                  bits=None if any(c.format.grid.is_int for c in configs)
                  else "it sets the width of kernelscope's INT quantizers, and the formats and targets given "
                       "carry their own",
                  group_size=None if any(c.format.is_block and c.format.grid.is_int
                                         for c in [*configs, *weights])
                  else "it sets the block of per_group, which neither -q nor --weight-format gives")
    return configs, targets, weights, transforms, calibrated


def run_profile(*, include_lm_head, top_k, resume, calib_dataset, calib_nsamples, given, **kw) -> None:
    from kernelscope.runs import distributed

    configs, targets, weights, transforms, calibrated = _quantizers(given, calib_nsamples=calib_nsamples,
                                                                    **kw)
    parallel = distributed.launched()
    checkpoint = _checkpoint(kw["output"], resume, parallel)
    if top_k < 1:
        fail(f"{flag('--top-k')} must be at least 1, got {top_k}")
    kw["device"], world = (_world(kw["device"], kw["device_map"]) if parallel
                           else (kw["device"], distributed.World()))
    quiet = kw["quiet"] or kw["as_json"] or not world.main
    with stage_progress(quiet) as display:
        calib_text = read_calibration(display, calibrated, calib_dataset, calib_nsamples, kw["seqlen"])
        prep = prepare(**prepare_options(kw, quiet=quiet, min_seqlen=1), display=display)
        check_widths(transforms, prep.loaded.model, kw["layers"])
        calibration = calibration_windows(prep, calib_text, calib_nsamples, kw) if calibrated else None
        display.plan("profiling", 1, len(world.windows(len(prep.windows))))
        result = _profile(prep, configs, display, checkpoint=checkpoint, resume=resume, layers=kw["layers"],
                          include_lm_head=include_lm_head, batch_size=kw["batch_size"], top_k=top_k,
                          weight_formats=weights, transforms=list(transforms), calibration=calibration,
                          calibration_text=calib_text, targets=targets)
    distributed.stop()
    if world.main:  # only the first process writes and prints
        _write(result, checkpoint, kw)


def _write(result, checkpoint, kw) -> None:
    """Write and show the result; on a failure to write, say that the statistics are kept in the
    checkpoint, from which --resume writes them without profiling again."""
    try:
        finish(result, kw["output"], kw["overwrite"], kw["as_json"], _show, kw["report"])
    except KernelscopeError as exc:
        if checkpoint is None or not checkpoint.is_file():
            raise
        raise KernelscopeError(f"{exc}; the statistics are kept in the checkpoint {checkpoint}: once that is "
                               "fixed, rerun the same command with --resume") from None
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
