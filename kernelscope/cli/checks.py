"""The checks and preambles the commands share: the options every perplexity command takes, the
options that do not apply, transforms, weights, calibration text and windows, ``--ignore`` and the
quantizer configurations of ``-q``/``-b``/``-a``. One definition each; every command module imports
them from here and none imports another command's module."""

from __future__ import annotations

from kernelscope.cli.common import (
    check_alphas,
    check_bits,
    check_positive,
    common_refusals,
    one_value,
    split_values,
)
from kernelscope.cli.console import fail, flag
from kernelscope.errors import KernelscopeError
from kernelscope.quant import DEFAULT_ALPHA, expand_configs

DEFAULT_SCHEMES = ("fp", "w8a8-per-token", "w8a8-crossquant")
"""The schemes ``eval`` and ``zeroshot`` compare when none is given."""
PERPLEXITY_MIN_SEQLEN = 2  # a window's first token is never predicted
MAX_TOLERANCE = 1.0  # a doubled perplexity is no longer "lossless" by any reading


def prepare_options(kw: dict, **extra) -> dict:
    """The options of a perplexity command that :func:`~kernelscope.cli.common.prepare` takes."""
    keys = ("model", "dataset", "nsamples", "seqlen", "windows", "seed", "layers", "batch_size", "dtype",
            "device", "trust_remote_code", "output", "overwrite", "device_map", "max_memory",
            "offload_folder")
    quiet = kw["quiet"] or kw["as_json"]
    return ({k: kw[k] for k in keys} | {"report": kw.get("report"), "quiet": quiet,
                                        "min_seqlen": PERPLEXITY_MIN_SEQLEN} | extra)


def option_refusals(kw: dict, seed_applies: bool = False) -> dict[str, str | None]:
    """When the options every perplexity command shares have no effect (see ``common_refusals``)."""
    return common_refusals(windows=kw["windows"], output=kw["output"], report=kw.get("report"),
                           device_map=kw["device_map"], seed_applies=seed_applies)


def read_calibration_text(calib_dataset: str, calib_nsamples: int, seqlen: int):
    """SmoothQuant's calibration text, read before the model loads so that a missing one fails fast."""
    from kernelscope.data import load_text

    return load_text(calib_dataset, max_chars=20 * calib_nsamples * seqlen, option=flag("--calib-dataset"))


def calibration_windows(prep, calib_text, calib_nsamples: int, kw: dict):
    """Random windows of the calibration text (seeded by --seed)."""
    from kernelscope.data import make_windows, tokenize

    ids = tokenize(prep.loaded.tokenizer, calib_text.text)
    return make_windows(ids, kw["seqlen"], calib_nsamples, selection="random", seed=kw["seed"],
                        names=(f"calibration text ({flag('--calib-dataset')})", flag("--calib-nsamples"),
                               flag("--seqlen")))


def read_ignore(value: str):
    """``--ignore``: ``@FILE`` read now (a missing or foreign file fails before the model loads), or a
    regular expression checked now."""
    import re

    from kernelscope.results.exports import read_ignore_file

    if value.startswith("@"):
        return read_ignore_file(value[1:], f"{flag('--ignore')} {value}")
    if not value.strip():
        fail(f"{flag('--ignore')} is empty; give a regular expression over module names or @FILE")
    try:
        re.compile(value)
    except re.error as exc:
        fail(f"{flag('--ignore')} {value!r} is not a valid regular expression: {exc}")
    return value


def ignored_names(spec, model, layers: str | None, value: str) -> list[str]:
    """The module names ``spec`` leaves in full precision on this model. A regular expression that
    matches none of the layers a scheme quantizes is refused; a file's names must each be a Linear of
    the model (a plan may keep none: then only lm_head is named)."""
    import re

    from kernelscope.capture import is_linear
    from kernelscope.models import select_linear_layers

    if not isinstance(spec, str):
        return spec.resolve({n: type(m).__name__ for n, m in model.named_modules() if is_linear(m)})
    selected = [layer.name for layer in select_linear_layers(model, layers)]
    names = [n for n in selected if re.search(spec, n)]
    if not names:
        fail(f"{flag('--ignore')} {value!r} matches none of the {len(selected)} layers a scheme quantizes "
             "here (see `kernelscope layers MODEL`)")
    return names


def one_alpha(alpha: str) -> float:
    """``--alpha`` where a command takes one α (a sweep takes several)."""
    value = one_value(alpha, "--alpha", float, "a number",
                      f"`kernelscope sweep MODEL --alpha {alpha}` compares several α")
    check_alphas([value])
    return value


def check_weights(weight_bits, group_size) -> None:
    """``--weight-bits`` in range, and ``--group-size`` only with it."""
    if weight_bits is not None:
        check_bits([weight_bits], "--weight-bits")
    if group_size is not None and group_size < 1:
        fail(f"{flag('--group-size')} must be at least 1, got {group_size}")
    if group_size is not None and weight_bits is None:
        fail(f"{flag('--group-size')} applies to quantized weights; give --weight-bits too")


def transform_options(values: list[str] | None, seed: int | None) -> dict:
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


def check_transforms_with_schemes(schemes, transforms: dict) -> None:
    """Refuse a transform that a scheme's own transform already applies (w8a8-smoothquant with
    --transform smoothquant)."""
    for s in schemes:
        for t in transforms:
            try:
                s.transform.then(t)
            except ValueError as exc:
                fail(f"{flag('--scheme')} {s.name} with {flag('--transform')} {transforms[t]}: {exc}; "
                     f"give the scheme without its own transform (w8a8-per-token for w8a8-smoothquant) "
                     f"instead")


def transform_refusals(specs, calibrated: bool) -> dict[str, str | None]:
    """When ``--transform-seed`` and the calibration options have no effect."""
    from kernelscope.quant.transforms import TRANSFORMS

    seeded = ", ".join(e.name for e in TRANSFORMS.values() if e.seeded)
    calibrated_names = ", ".join(e.name for e in TRANSFORMS.values() if e.calibrated)
    no_calibration = (f"it calibrates a transform ({calibrated_names}) or a deployment target's static "
                      "activation scales, and no --transform or --scheme given needs calibration")
    return {
        "transform_seed": None if any(s.seeded for s in specs)
        else f"it seeds the random signs of a {seeded} --transform, and none is given",
        "calib_dataset": None if calibrated else no_calibration,
        "calib_nsamples": None if calibrated else no_calibration,
    }


def check_widths(specs: dict, model, layers: str | None) -> None:
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


def profile_configs(quantizer: list[str] | None, bits: list[str] | None, alpha: list[str] | None,
                    group_size: int | None):
    """``profile``'s configurations (per-token and CrossQuant at INT8 and INT4 unless given) and the
    deployment targets among ``-q`` (``LIBRARY:NAME``, ``LIBRARY:@FILE``), as schemes."""
    from kernelscope.runs.schemes import parse_scheme

    names = split_values(quantizer, "--quantizer", str, "a quantizer") if quantizer else []
    targets = [parse_scheme(n) for n in names if ":" in n]
    own = [n for n in names if ":" not in n]
    if targets and not own:
        return [], targets
    configs = quantizer_configs(own or ["per_token", "crossquant"], bits or ["8", "4"],
                                alpha or [str(DEFAULT_ALPHA)], group_size)
    return configs, targets


def quantizer_configs(quantizer: list[str], bits: list[str], alpha: list[str], group_size: int | None):
    """``-q``, ``-b`` and ``-a`` as typed (repeated or comma-separated) -> the configurations: every INT
    quantizer at every width (CrossQuant at every α), every float format once."""
    names = split_values(quantizer, "--quantizer", str, "a quantizer")
    widths = split_values(bits, "--bits", int, "a whole number")
    alphas = split_values(alpha, "--alpha", float, "a number")
    check_bits(widths)
    check_alphas(alphas)
    check_positive("--group-size", group_size)
    target = next((n for n in names if ":" in n), None)
    if target is not None:
        fail(f"{flag('--quantizer')} {target} is a deployment target, and this command runs kernelscope's "
             f"own formats; `kernelscope profile MODEL -q {target}` counts that target's kernel, layer by "
             "layer, in its library's arithmetic")
    try:
        return expand_configs(names, widths, alphas, group_size)
    except ValueError as exc:
        raise KernelscopeError(f"{flag('--quantizer')}: {exc}") from None




def scheme_options(values: list[str] | None, **settings) -> list:
    """``--scheme`` values (repeated or comma-separated; default :data:`DEFAULT_SCHEMES`) as schemes. Every
    unknown name is named at once, and a scheme given twice (in any spelling) is named with both
    spellings."""
    from kernelscope.runs.schemes import parse_scheme

    names = split_values(values, "--scheme", str, "a scheme") if values else list(DEFAULT_SCHEMES)
    schemes, unknown, why = [], [], ""
    for name in names:
        try:
            schemes.append((name, parse_scheme(name, **settings)))
        except KernelscopeError as exc:
            if not str(exc).startswith("unknown scheme"):
                raise
            unknown.append(name)
            why = why or str(exc).split("; ", 1)[1]  # the choices, said once
    if unknown:
        fail(f"{flag('--scheme')}: unknown scheme{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
             f"{why}")
    seen: dict[str, str] = {}
    for typed, scheme in schemes:
        if scheme.name in seen:
            fail(f"{flag('--scheme')} {typed} is given twice (as {seen[scheme.name]}); give each scheme once")
        seen[scheme.name] = typed
    return [scheme for _, scheme in schemes]
