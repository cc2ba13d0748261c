"""Typer commands: each declares its options and hands them to a runner in this package.

Errors a user can cause print one line on stderr and exit with status 2; nothing is written then.
Heavy imports (torch, transformers) happen inside the runners, so ``--help`` answers at once.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from kernelscope.cli import options as o
from kernelscope.cli.console import (
    EXIT_USAGE,
    check_int64,
    err,
    flag,
    mark_started,
    out,
    remember_options,
    show_table,
)
from kernelscope.cli.options import DEFAULT_WINDOWS
from kernelscope.errors import Interrupted, KernelscopeError
from kernelscope.quiet import QUIET_LOGGERS

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exceptions
    from click.core import ParameterSource

_ABORT = tuple(m.Abort for m in (click_exceptions, typer) if hasattr(m, "Abort"))

def _plain(param):
    """Show a parameter in help as click does (``N``, ``TEXT``, nothing for a switch, ``MODEL`` in the
    usage line) rather than typer's type labels (``<int>``, ``<bool>``, ``{model}``)."""
    if isinstance(param, TyperArgument):
        name = param.metavar or param.name.upper()
        param.display_type_rich = lambda ctx: None
        param._usage_display_name = lambda: name + ("..." if param.nargs != 1 else "")
    elif param.metavar is None:
        kind = param.bare_type() if hasattr(param, "bare_type") else getattr(param.type, "name", "value")
        param.metavar = "" if getattr(param, "is_flag", False) else _VALUE_NAMES.get(kind, kind.upper())
    return param


_VALUE_NAMES = {"str": "TEXT", "int": "N", "float": "NUMBER", "Path": "PATH", "bool": ""}


class _PlainHelp:
    """A command or group whose help shows value names, not type labels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        return option if option is None else _plain(option)


class _Command(_PlainHelp, TyperCommand):
    pass


class _Group(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="kernelscope",
    help="Measure the quantization kernel of a causal LM (the activation elements a quantizer "
    "rounds to zero) per layer, per-token against CrossQuant, and what it costs in perplexity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_ARGS: list[str] = []  # the arguments of this invocation, as typed


def _given(ctx: typer.Context) -> frozenset[str]:
    """The parameters the user gave (on the command line or through the environment), not defaults."""
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in typed)


def _print_version(value: bool) -> None:
    if value:
        from kernelscope.version import __version__

        out.print(f"kernelscope {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print kernelscope's version and exit (`kernelscope version` "
                                               "also lists the libraries').")] = False,
) -> None:
    # the options of kernelscope itself; its help text is the app's
    return None


def _run(runner, options: dict) -> None:
    """Call a runner with what the user typed (``given``); Ctrl-C becomes one line saying what was
    kept, and exit status 130."""
    ctx = options.pop("ctx")
    remember_options(ctx.command.params, _ARGS)
    check_int64(options)
    try:
        runner(given=_given(ctx), **options)
    except Interrupted as exc:
        err.print(f"[bold red]interrupted[/]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None


@app.command(cls=_Command)
def profile(
    ctx: typer.Context,
    model: o.Model,
    dataset: o.Dataset = "wikitext2",
    nsamples: o.Nsamples = DEFAULT_WINDOWS,
    seqlen: o.Seqlen = 2048,
    windows: o.WindowsSel = "first",
    seed: o.Seed = 0,
    quantizer: o.ProfileQuantizers = None,
    bits: o.ProfileBits = None,
    alpha: o.ProfileAlphas = None,
    group_size: o.PerGroupSize = None,
    weight_format: o.WeightFormats = None,
    transform: o.ProfileTransform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    layers: o.Layers = None,
    include_lm_head: o.IncludeLmHead = False,
    batch_size: o.BatchSize = 1,
    top_k: o.TopK = 10,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    report: o.Report = None,
    resume: o.Resume = False,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Profile the quantization kernel of every decoder Linear input over calibration text.

    Writes layers.parquet (one row per layer x quantizer x transform), weights.parquet and summary.json
    with --output. With --transform, every quantizer is also counted in each transformed basis.
    To share the windows among processes, launch it as
    `torchrun --standalone --nproc-per-node N -m kernelscope profile ...`; the statistics merge exactly.
    """
    options = dict(locals())
    from kernelscope.cli.profile_cmd import run_profile

    _run(run_profile, options)


@app.command("eval", cls=_Command)
def evaluate(
    ctx: typer.Context,
    model: o.Model,
    scheme: o.EvalSchemes = None,
    dataset: o.Dataset = "wikitext2",
    nsamples: o.Nsamples = DEFAULT_WINDOWS,
    seqlen: o.Seqlen = 2048,
    windows: o.WindowsSel = "first",
    seed: o.Seed = 0,
    alpha: o.EvalAlpha = "0.15",
    bits: o.RemoveKernelBits = 8,
    weight_bits: o.WeightBits = None,
    group_size: o.GroupSize = None,
    smooth_alpha: o.EvalSmoothAlpha = 0.5,
    transform: o.Transform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    layers: o.Layers = None,
    ignore: o.Ignore = None,
    sqnr: o.Sqnr = False,
    batch_size: o.BatchSize = 1,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    report: o.Report = None,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Perplexity under quantization schemes, all in one run (one model load, one tokenization).

    Each perplexity comes with a 95% bootstrap interval over the windows and
    each change from fp with a paired one; a change whose interval contains 0
    is reported as not separable from fp.

    Weights are per-channel unless the scheme says g128; lm_head stays in full precision.
    With --transform, every scheme runs under each transform, quantizing in its basis.
    Writes summary.json and eval.parquet (and sqnr.parquet with --sqnr) with --output.
    """
    options = dict(locals())
    from kernelscope.cli.eval_cmd import run_eval

    _run(run_eval, options)


@app.command(cls=_Command)
def threshold(
    ctx: typer.Context,
    model: o.Model,
    dataset: o.Dataset = "wikitext2",
    nsamples: o.Nsamples = DEFAULT_WINDOWS,
    seqlen: o.Seqlen = 2048,
    windows: o.WindowsSel = "first",
    seed: o.Seed = 0,
    tolerance: o.ThresholdTolerance = 0.01,
    steps: o.Steps = 6,
    family: o.Family = "per-token",
    family_bits: o.FamilyBits = 8,
    alpha: o.ThresholdAlpha = "0.15",
    weight_bits: o.WeightBits = None,
    group_size: o.GroupSize = None,
    transform: o.Transform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    layers: o.Layers = None,
    batch_size: o.BatchSize = 1,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    report: o.Report = None,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Locate the kernel proportion at which removing the kernel starts to cost perplexity.

    Walks the family K_λ = {|x| <= λ·B} (B the zero bound of the --family quantizer at --family-bits,
    per-token INT8 by default), brackets the crossing of the tolerance and bisects it, then places the
    model's per-token and CrossQuant kernels against it. With --transform, one search per transform,
    the kernel removed (and measured) in its basis.
    """
    options = dict(locals())
    from kernelscope.cli.eval_cmd import run_threshold

    _run(run_threshold, options)


@app.command(cls=_Command)
def sweep(
    ctx: typer.Context,
    model: o.Model,
    quantizer: o.SweepQuantizers = None,
    alpha: o.SweepAlphas = None,
    dataset: o.Dataset = "wikitext2",
    nsamples: o.Nsamples = DEFAULT_WINDOWS,
    seqlen: o.Seqlen = 2048,
    windows: o.WindowsSel = "first",
    seed: o.Seed = 0,
    bits: o.SweepBits = None,
    weight_bits: o.SweepWeightBits = 8,
    group_size: o.GroupSize = None,
    transform: o.Transform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    layers: o.Layers = None,
    batch_size: o.BatchSize = 1,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    report: o.Report = None,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Kernel % and perplexity for each CrossQuant α (α = 1 reproduces per-token), or for several
    quantizers side by side (-q per_token,mxfp4,nvfp4), under each --transform."""
    options = dict(locals())
    from kernelscope.cli.eval_cmd import run_sweep

    _run(run_sweep, options)


@app.command(cls=_Command)
def zeroshot(
    ctx: typer.Context,
    model: o.Model,
    scheme: o.ZeroshotSchemes = None,
    tasks: o.Tasks = None,
    include_path: o.IncludePath = None,
    limit: o.Limit = None,
    num_fewshot: o.NumFewshot = None,
    batch_size: o.ZeroshotBatchSize = 1,
    seed: o.HarnessSeed = None,
    alpha: o.ZeroshotAlpha = "0.15",
    bits: o.RemoveKernelBits = 8,
    weight_bits: o.WeightBits = None,
    group_size: o.GroupSize = None,
    smooth_alpha: o.ZeroshotSmoothAlpha = 0.5,
    transform: o.Transform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    calib_seqlen: o.CalibSeqlen = 512,
    layers: o.Layers = None,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    report: o.Report = None,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """Zero-shot accuracy under quantization schemes, through lm-evaluation-harness (one model load).

    For each scheme, the scheme is applied to the model in memory and the harness scores every task on it.
    Shows accuracy ± standard error per task and scheme, and the change from fp in points.
    Needs the extra: pip install 'kernelscope\\[zeroshot]'.
    Writes summary.json, zeroshot.parquet and zeroshot_items.parquet (each item's log-likelihoods) with -o.
    """
    options = dict(locals())
    from kernelscope.cli.zeroshot_cmd import run_zeroshot

    _run(run_zeroshot, options)


@app.command(cls=_Command)
def advise(
    ctx: typer.Context,
    model: o.Model,
    scheme: o.AdviseSchemes,
    tolerance: o.AdviseTolerance = 0.01,
    budget: o.Budget = None,
    dataset: o.Dataset = "wikitext2",
    nsamples: o.Nsamples = DEFAULT_WINDOWS,
    seqlen: o.Seqlen = 2048,
    windows: o.WindowsSel = "first",
    seed: o.Seed = 0,
    holdout: o.Holdout = None,
    per_layer: o.PerLayer = False,
    kernel_groups: o.KernelGroups = None,
    alpha: o.AdviseAlpha = "0.15",
    bits: o.AdviseBits = 8,
    weight_bits: o.WeightBits = None,
    group_size: o.GroupSize = None,
    smooth_alpha: o.AdviseSmoothAlpha = 0.5,
    transform: o.AdviseTransform = None,
    transform_seed: o.TransformSeed = None,
    calib_dataset: o.CalibDataset = "pileval",
    calib_nsamples: o.CalibNsamples = 64,
    layers: o.Layers = None,
    batch_size: o.BatchSize = 1,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemoteCode = False,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    as_json: o.AsJson = False,
    quiet: o.Quiet = False,
) -> None:
    """The fewest Linear layers to keep in full precision for --scheme to stay within --tolerance.

    Measures each module type and block quantized alone (and with only its
    kernel removed), keeps the most sensitive cells (the layers of a block fed
    one input) until the measured perplexity is within tolerance, and reports
    that plan's own measured perplexity and interval.

    --output writes summary.json (the plan), the sensitivity, cells and search tables,
    modules.txt, and recipe.yaml (llm-compressor) and modelopt_quant_cfg.yaml where that library
    computes the scheme as measured (summary.json says why not);
    `kernelscope eval MODEL -d TEXT -s N -n N --scheme fp,SCHEME --ignore @DIR`, on the same
    text and windows, measures the plan again (the command is printed whole at the end).
    """
    options = dict(locals())
    from kernelscope.cli.advise_cmd import run_advise

    _run(run_advise, options)


@app.command(cls=_Command)
def report(
    ctx: typer.Context,
    runs: o.ReportRuns,
    output: o.ReportOutput = Path("report.html"),
    title: o.ReportTitle = None,
    overwrite: o.ReportOverwrite = False,
) -> None:
    """Write one self-contained HTML report (plotly embedded, opens offline) from the run folders of any
    command: profile, eval, threshold, sweep, advise and zeroshot."""
    from kernelscope.reports import write_report

    remember_options(ctx.command.params, _ARGS)
    path = write_report(runs, output, overwrite=overwrite, title=title, option=flag("--output"))
    out.print(f"wrote [bold]{escape(str(path))}[/] ({path.stat().st_size / 1e6:.1f} MB, {len(runs)} run(s))")


@app.command("layers", cls=_Command)
def list_layers(
    ctx: typer.Context,
    model: o.Model,
    layers: o.LayersRegex = None,
    include_lm_head: o.ListLmHead = False,
    trust_remote_code: o.TrustRemoteCode = False,
) -> None:
    """List the Linear layers a profile would capture, with block and module type."""
    from rich.table import Table

    from kernelscope.cli.common import load_with_status
    from kernelscope.models import select_linear_layers

    remember_options(ctx.command.params, _ARGS)
    loaded = load_with_status(model, "float32", "cpu", trust_remote_code, quiet=False)
    selected = select_linear_layers(loaded.model, layers, include_lm_head=include_lm_head)
    table = Table(title=f"{len(selected)} Linear layers")
    for col in ("layer", "block", "module type", "in features"):  # a long layer name folds
        table.add_column(col, no_wrap=col == "block", overflow="fold" if col == "layer" else "ellipsis")
    for layer in selected:
        table.add_row(escape(layer.name), "" if layer.block is None else str(layer.block),
                      escape(layer.module_type), str(layer.in_features))
    show_table(table)


@app.command("targets", cls=_Command)
def list_targets(
    ctx: typer.Context,
    as_json: o.AsJson = False,
) -> None:
    """List the deployment targets: a library's scheme computed with that library's own arithmetic
    (--scheme llm-compressor:W8A8, modelopt:INT8_DEFAULT_CFG; a file of yours: llm-compressor:@recipe.yaml,
    modelopt:@quant_cfg.yaml), each with the version it was checked against bit for bit; and the schemes
    refused, with the reason."""
    remember_options(ctx.command.params, _ARGS)
    from rich.table import Table

    from kernelscope.quant.targets import target_rows

    rows = target_rows()
    if as_json:
        from kernelscope.results import to_json

        print(to_json(rows, indent=2))
        return
    known = sum(r["refused"] is None for r in rows)
    table = Table(title=f"{known} deployment targets (--scheme LIBRARY:NAME)")
    for col in ("scheme", "weights", "input activations", "checked against"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["refused"] is None:
            acts = (r["input_activations"] or "fp") + (" (calibrated)" if r["calibrated"] else "")
            if r["smoothquant_alpha"] is not None:
                acts += f", after its smoothquant (alpha {r['smoothquant_alpha']:g})"
            weights = r["weights"] or "fp"
            table.add_row(escape(r["scheme"]), escape(weights), escape(acts), escape(r["checked"]))
    show_table(table)
    for r in rows:
        if r["refused"] is not None:
            out.print(f"[dim]{escape(r['scheme'])} is refused: {escape(r['refused'])}[/]")


@app.command("formats", cls=_Command)
def list_formats(
    ctx: typer.Context,
    as_json: o.AsJson = False,
) -> None:
    """List the number formats kernelscope counts: each a scale rule, an element grid and the zero
    threshold τ (an element is in the kernel when |x / scale| <= τ), with the schemes that use it."""
    remember_options(ctx.command.params, _ARGS)
    from kernelscope.cli.common import show_formats

    show_formats(as_json)


@app.command(cls=_Command)
def version() -> None:
    """Print the versions of kernelscope and the libraries it runs on."""
    from kernelscope.results import to_json
    from kernelscope.runs.common import versions

    print(to_json(versions(), indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every user error into one line and exit status 2."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars; kernelscope shows rich ones
    for name in QUIET_LOGGERS:  # what libraries say on import is no concern of the command's user
        logging.getLogger(name).setLevel(logging.ERROR)
    mark_started()
    command = typer.main.get_command(app)
    _ARGS[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=argv, prog_name="kernelscope", standalone_mode=False)
    except KernelscopeError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except click_exceptions.NoArgsIsHelpError as exc:
        err.print(exc.format_message(), soft_wrap=True, markup=False)
        sys.exit(EXIT_USAGE)
    except click_exceptions.ClickException as exc:
        err.print(f"[bold red]error:[/] {escape(exc.format_message())}", soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except (KeyboardInterrupt, *_ABORT):
        err.print("[bold red]interrupted[/]: nothing was written")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KERNELSCOPE_DEBUG"):
            raise
        err.quiet = False  # an internal error is each process's own: under torchrun every one says it
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # a path typed for any option
            err.print(f"[bold red]error:[/] {escape(str(exc.filename))} is longer than the file system "
                      "allows (a name of at most 255 bytes); give a shorter path", soft_wrap=True)
            sys.exit(EXIT_USAGE)
        err.print(f"[bold red]error:[/] internal error, {type(exc).__name__}: {escape(str(exc))} "
                  "(set KERNELSCOPE_DEBUG=1 for the traceback)", soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _terminated(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) ends a run as Ctrl-C does: hooks removed, partial files
    removed, one line saying so."""
    raise KeyboardInterrupt


def run() -> None:
    """The installed command and ``python -m kernelscope``: :func:`main`, then a prompt exit.

    Once output is flushed and the exit handlers have run, nothing is left to write, so the
    interpreter's teardown of torch and transformers (about two seconds on a small machine) is
    skipped: a finished or interrupted run returns the prompt at once.
    """
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)
