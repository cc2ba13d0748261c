"""``kernelscope profile``: check every option, load, run with a progress bar, show and save."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kernelscope.cli.app import err, fail, out
from kernelscope.errors import KernelscopeError
from kernelscope.quant import DEFAULT_ALPHA, expand_configs


def load_with_status(model: str, dtype: str, device: str, trust_remote_code: bool, *, quiet: bool):
    """Load a model behind a spinner on stderr."""
    from kernelscope.models import load_model

    if quiet:
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    with err.status(f"loading model {escape(model)} ..."):
        return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _configs(quantizer, bits, alpha):
    quantizer = quantizer or ["per_token", "crossquant"]
    bits = bits or [8, 4]
    alpha = alpha if alpha is not None else [DEFAULT_ALPHA]
    for b in bits:
        if not 2 <= b <= 8:
            fail(f"--bits {b} is out of range; give a bit width from 2 to 8")
    for a in alpha:
        if not 0.0 <= a <= 1.0:  # also false for NaN
            fail(f"--alpha {a} is out of range; give a value in [0, 1] (1 is per-token)")
    try:
        return expand_configs(quantizer, bits, alpha)
    except ValueError as exc:
        raise KernelscopeError(f"--quantizer: {exc}") from None


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _show(result) -> None:
    s = result.summary
    m = s["model"]
    lines = [
        f"[bold]model[/]   {escape(str(m.get('path', m.get('architecture'))))}  "
        f"({m.get('architecture')}, {m.get('parameters', 0) / 1e6:.0f}M parameters, {m.get('dtype')}, "
        f"{m.get('device')})",
        f"[bold]text[/]    {escape(s['text']['description'])}  sha256 {s['text']['sha256'][:12]}",
        f"[bold]windows[/] {escape(s['windows']['description'])}",
        f"[bold]layers[/]  {s['layers']['count']} Linear inputs, {s['tokens']:,} tokens in "
        f"{s['seconds']:.1f} s ({s['tokens_per_second']:,.0f} tokens/s)",
    ]
    out.print(Panel("\n".join(lines), title="kernelscope profile", expand=False))

    model_table = Table(title="Model-level kernel (elements-weighted over all covered Linear inputs)")
    for col, justify in (("quantizer", "left"), ("kernel", "right"), ("kernel elements", "right"),
                         ("of elements", "right")):
        model_table.add_column(col, justify=justify)
    for row in result.model_level.iter_rows(named=True):
        model_table.add_row(row["config"], _pct(row["kernel_fraction"]), f"{row['kernel_elements']:,}",
                            f"{row['elements']:,}")
    out.print(model_table)
    c_ge_t = result.model_level["c_ge_t_fraction"][0]
    out.print(f"pairs with c_j >= t_i (where CrossQuant's bound is not below per-token's): "
              f"[bold]{_pct(c_ge_t)}[/]")

    wide = result.by_module_type.pivot(on="config", index="module_type", values="kernel_fraction",
                                       maintain_order=True)
    c_by_type = result.by_module_type.group_by("module_type", maintain_order=True).agg(
        pl.col("c_ge_t_fraction").first())
    wide = wide.join(c_by_type, on="module_type", how="left", maintain_order="left")
    type_table = Table(title="Kernel by module type")
    for col in wide.columns:
        name = {"module_type": "module", "c_ge_t_fraction": "c >= t"}.get(col, col)
        type_table.add_column(name, justify="left" if col == "module_type" else "right")
    for row in wide.iter_rows():
        type_table.add_row(escape(str(row[0])), *(_pct(v) for v in row[1:]))
    out.print(type_table)


def run_profile(*, model, dataset, nsamples, seqlen, windows, seed, quantizer, bits, alpha, layers,
                include_lm_head, batch_size, top_k, dtype, device, trust_remote_code, output,
                overwrite, as_json, quiet) -> None:
    from kernelscope.data import load_text, make_windows, tokenize
    from kernelscope.results import check_output_dir
    from kernelscope.runs import profile

    # Everything that can be checked without the model is checked first, and nothing is written.
    if nsamples < 1:
        fail(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 1:
        fail(f"--seqlen must be at least 1, got {seqlen}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if top_k < 1:
        fail(f"--top-k must be at least 1, got {top_k}")
    if windows not in ("first", "random"):
        fail(f"--windows must be `first` or `random`, got {windows!r}")
    configs = _configs(quantizer, bits, alpha)
    from kernelscope.models import resolve_model_source

    resolve_model_source(model)
    if output is not None:
        check_output_dir(output, overwrite)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from kernelscope.models import parse_device, parse_dtype

    parse_dtype(dtype, parse_device(device))
    if layers is not None:
        import re

        try:
            re.compile(layers)
        except re.error as exc:
            fail(f"--layers {layers!r} is not a valid regular expression: {exc}")

    quiet = quiet or as_json
    text = load_text(dataset, max_chars=20 * nsamples * seqlen)
    loaded = load_with_status(model, dtype, device, trust_remote_code, quiet=quiet)
    limit = loaded.info.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        fail(f"--seqlen {seqlen} is beyond the model's context of {limit} tokens")
    ids = tokenize(loaded.tokenizer, text.text)
    chosen = make_windows(ids, seqlen, nsamples, selection=windows, seed=seed)

    progress = Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("windows"), TimeElapsedColumn(), console=err, disable=quiet,
                        transient=True)
    with progress:
        task = progress.add_task("profile", total=len(chosen))
        result = profile(loaded, chosen, configs, text=text, layers=layers,
                         include_lm_head=include_lm_head, batch_size=batch_size, top_k=top_k,
                         progress=lambda done, total: progress.update(task, completed=done))
    if output is not None:
        result.summary["output"] = str(Path(output))
        result.save(output, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.summary, indent=2, default=str))
        return
    _show(result)
    if output is not None:
        out.print(f"wrote [bold]{escape(str(output))}[/] (layers.parquet, summary.json)")
