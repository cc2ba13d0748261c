"""What a plan becomes for the tools that deploy it, and how those files are read back.

Beside its ``summary.json`` (kind ``advise``) an advice folder holds:

- ``recipe.yaml``: an llm-compressor recipe, one ``QuantizationModifier`` with ``targets: [Linear]``,
  explicit ``config_groups`` (every compressed-tensors ``QuantizationArgs`` field that decides the
  arithmetic: element type and bits, strategy, group, dynamic, scale dtype) and ``ignore:`` listing
  every Linear the plan leaves in full precision (``lm_head``, the kept layers, and any Linear the
  measurement did not cover);
- ``modelopt_quant_cfg.yaml``: a full ModelOpt ``QuantizeConfig`` in ModelOpt's own recipe form (YAML
  with its ``modelopt-schema`` line; JSON cannot carry ``block_sizes``' integer axis keys), loaded as
  written by ``mtq.quantize(model, yaml.safe_load(f), forward_loop)`` or
  ``modelopt.torch.opt.config_loader.load_config(path)``: every quantizer off, then the weight and input
  quantizer of each quantized Linear by its own name, then ModelOpt's default exclusions, then every
  full-precision Linear's quantizers off; ``algorithm`` as ModelOpt's config of the same quantizers has it;
- ``modules.txt``: the kept layers' module names, one a line.

A file is written only where its library computes the same format as the scheme measured: the same
element grid, the same unit of the scale, the same scale rule, scales taken when kernelscope takes them
(per sequence, per token, from the weight). Otherwise that library's file is not written and the
summary says why: compressed-tensors' INT scale is ``amax / 127.5`` (not ``amax / 127``), its MX scale
rounds the block maximum up from a mantissa of 1.75 (neither OCP's FLOOR nor RCEIL), ModelOpt's MX scale
is RCEIL (so only ``mxfp4_rceil`` is ModelOpt's MXFP4), and neither takes a per-sequence activation scale.
Differences in the last bit of the arithmetic (a product by ``qmax / amax`` against a quotient by
``amax / qmax``, the tensor's dtype against float32) and in the floor of a near-zero scale are written
as notes beside the file, never into its configuration.

Which arguments a scheme means is derived from the formats registry (element grid, scale unit and
form, block size); presets (compressed-tensors' from :mod:`kernelscope.quant.targets`,
:data:`MODELOPT_PRESETS`) are data matched on those arguments, never on names. Pure text and dict
building; the run folder writes the files.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kernelscope.errors import KernelscopeError
from kernelscope.quant import quant_cfg
from kernelscope.quant.formats import Form, Format, Unit
from kernelscope.results.paths import EXPORT_NAMES, SUMMARY, summary_of

RECIPE, MODELOPT, MODULES = EXPORT_NAMES

WEIGHTS, ACTIVATIONS = "weights", "input_activations"
LLM_COMPRESSOR, MODEL_OPT = "llm-compressor", "ModelOpt"
CHECKED = {LLM_COMPRESSOR: "compressed-tensors 0.20.1", MODEL_OPT: "nvidia-modelopt 0.47.0"}
"""The library versions whose code the rules below were read from and tested against."""


class Refused(Exception):
    """A quantizer a library cannot express exactly; the message says why."""


def _role(role: str) -> str:
    return "weights" if role == WEIGHTS else "activations"


def _element(fmt: Format) -> str:
    """``INT8``, ``E4M3``, ``E2M1``: the element grid as the libraries name it."""
    grid = fmt.grid
    return f"INT{grid.bits}" if grid.is_int else f"E{grid.exponent_bits}M{grid.mantissa_bits}"


def _structure(fmt: Format, role: str, library: str) -> str:
    """The unit of ``fmt``'s scale as ``library`` must take it: ``token``, ``channel`` (a weight's output
    channel), ``tensor`` (a whole weight) or ``block``; refused where the library has no such unit."""
    unit = fmt.rule.unit
    if unit is Unit.CROSSQUANT:
        raise Refused(f"{fmt.name}'s step t^a * c^(1-a) combines a token's and a channel's maxima; no "
                      "deploying library has such a scale")
    if unit is Unit.CHANNEL:
        raise Refused(f"{fmt.name} takes one step per input channel over the tokens of a sequence; no "
                      "deploying library has such a scale")
    if unit is Unit.TENSOR and role == ACTIVATIONS:
        raise Refused(f"{fmt.name} takes one activation scale per sequence; {library} calibrates a "
                      "static per-tensor scale once, and its dynamic one spans the whole batch")
    if unit is Unit.BLOCK:
        return "block"
    if unit is Unit.TENSOR:
        return "tensor"
    return "token" if role == ACTIVATIONS else "channel"


def _floor_note(fmt: Format, library: str, theirs: str) -> tuple[str, ...]:
    """The note for a scale floor kernelscope has and ``library`` has not (None without a floor)."""
    floor = fmt.rule.floor
    if not floor:
        return ()
    below = floor * fmt.grid.max_value
    return ((f"{fmt.name}: a unit whose abs-max is below {below:.3g} gets kernelscope's floored scale "
            f"{floor:.3g}; {library} {theirs}"),)


def _nvfp4_block_note(fmt: Format, library: str) -> str:
    smallest = fmt.grid.max_value * 448.0 * 2.0**6
    return (f"{fmt.name}: kernelscope clamps an E4M3 block scale to 2^-6 at least; {library} keeps E4M3 "
            f"subnormal block scales, so a block whose max is under 1/{smallest:g} of the tensor's rounds "
            "differently")


def _nvfp4_activations(fmt: Format, library: str) -> Refused:
    return Refused(f"{fmt.name} takes the activations' tensor scale from each sequence; {library} "
                   "calibrates it once (a static max over the calibration data)")


# -- compressed-tensors (llm-compressor) --------------------------------------------------------------

CT_FLOATS = {8: (4, 3), 6: (2, 3), 4: (2, 1)}
"""compressed-tensors' one float element per width, as (exponent bits, mantissa bits): FP8_E4M3_DATA,
FP6_E2M3_DATA, FP4_E2M1_DATA (quant_args.py)."""
CT_MX_ROUND_UP = {8: 1.75, 6: 1.9375, 4: 1.75}
"""Per float width, the mantissa of a block's maximum from which compressed-tensors' MX scale rounds it
up to the next power of two (mxfp_utils.round_to_power_2, keeping E2M1's one mantissa bit for FP4 and
FP8, E2M3's three for FP6) before ``⌊log2⌋ - ⌊log2 max⌋``."""


def _ct_float(fmt: Format) -> int:
    """The ``num_bits`` of ``fmt``'s float element in compressed-tensors; refused if it has none."""
    grid = fmt.grid
    theirs = CT_FLOATS.get(grid.bits)
    if theirs != (grid.exponent_bits, grid.mantissa_bits):
        what = f"is E{theirs[0]}M{theirs[1]}" if theirs else "does not exist"
        raise Refused(f"compressed-tensors' {grid.bits}-bit float element {what}; {fmt.name} has "
                      f"{_element(fmt)} elements")
    return grid.bits


def llmcompressor_args(fmt: Format, role: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The compressed-tensors ``QuantizationArgs`` fields that quantize ``role`` exactly as ``fmt``, and
    the notes on what differs below the format; raises :class:`Refused` where none do."""
    structure = _structure(fmt, role, LLM_COMPRESSOR)
    grid, form = fmt.grid, fmt.rule.form
    if grid.is_int:
        n = grid.bits
        raise Refused(f"compressed-tensors divides an INT{n} unit's abs-max by {(2**n - 1) / 2:g} and "
                      f"rounds to {-(2 ** (n - 1))}..{2 ** (n - 1) - 1} (calculate_qparams); {fmt.name} "
                      f"divides by {grid.max_value:g} and rounds to +-{grid.max_value:g}")
    bits = _ct_float(fmt)
    if form.e8m0:
        ours = (f"2^(floor(log2 amax) - {grid.emax}) (OCP FLOOR)" if form is Form.E8M0_FLOOR
                else f"2^ceil(log2(amax / {grid.max_value:g})) (RCEIL)")
        raise Refused(f"compressed-tensors' MX scale rounds a block's maximum up to the next power of two "
                      f"from a mantissa of {CT_MX_ROUND_UP[bits]:g} before taking floor(log2) - "
                      f"{grid.emax} (mxfp_utils.generate_mx_scales); {fmt.name}'s is {ours}")
    dynamic = role == ACTIVATIONS
    args: dict[str, Any] = {"num_bits": bits, "type": "float", "symmetric": True}
    if form is Form.NVFP4:
        if dynamic:
            raise _nvfp4_activations(fmt, LLM_COMPRESSOR)
        args |= {"strategy": "tensor_group", "group_size": fmt.block_size, "dynamic": False,
                 "scale_dtype": "float8_e4m3fn"}
        return args, (_nvfp4_block_note(fmt, LLM_COMPRESSOR),
                      (f"{fmt.name}: compressed-tensors divides the block scale by the global scale "
                      "448 * 6 / amax where kernelscope multiplies it by amax / (448 * 6), so a dequantized "
                      "value may differ in its last bit"))
    strategy = "group" if structure == "block" else structure
    args |= {"strategy": strategy, "dynamic": dynamic}
    notes = [(f"{fmt.name}: compressed-tensors computes the scale and x / s in the tensor's own dtype "
             "(bfloat16 for a bfloat16 model), kernelscope in float32")]
    if strategy == "group":
        args["group_size"] = fmt.block_size
        notes.append(f"{fmt.name}: compressed-tensors refuses a Linear whose inputs do not split into "
                     "whole groups; kernelscope quantizes a short last block")
    notes += _floor_note(fmt, LLM_COMPRESSOR, "has none (only a zero scale becomes eps)")
    return args, tuple(notes)


# -- ModelOpt -------------------------------------------------------------------------------------------

MODELOPT_FLOATS = ((4, 3), (5, 2), (2, 1), (1, 2), (0, 3), (3, 0), (3, 2), (2, 3))
"""The float elements ``QuantizerAttributeConfig.validate_num_bits`` accepts; all but E4M3 only in
dynamic blocks (config.py)."""
MX_BLOCK = 32


def _modelopt_mx(fmt: Format) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The ModelOpt MX quantizer: dynamic blocks of 32 under E8M0 scales, RCEIL only."""
    grid = fmt.grid
    if fmt.rule.form is Form.E8M0_FLOOR:
        raise Refused(f"ModelOpt's MX scale is 2^ceil(log2(amax / {grid.max_value:g})) (RCEIL: "
                      f"compute_scale_e8m0_NV in tensor_quant_mx.cu); {fmt.name}'s OCP FLOOR scale "
                      f"2^(floor(log2 amax) - {grid.emax}) is half of it for every block whose maximum "
                      f"has a mantissa above {grid.max_value / 2.0**grid.emax:g}, {grid.max_value:g}'s")
    if fmt.block_size != MX_BLOCK:
        raise Refused(f"ModelOpt's MX formats take blocks of {MX_BLOCK}; {fmt.name} here has blocks of "
                      f"{fmt.block_size}")
    cfg = {"num_bits": [grid.exponent_bits, grid.mantissa_bits],
           "block_sizes": {-1: MX_BLOCK, "type": "dynamic", "scale_bits": [8, 0]}}
    return cfg, ((f"{fmt.name}: ModelOpt fake-quantizes MX formats only with its CUDA extension "
                 "(tensor_quant_mx.cu); its MXFP4 export (MXFP4QTensor.quantize) rounds ties of the "
                 "elements toward zero and takes the scale's exponent from a float32 log2, which can "
                 "round a quotient just above a power of two down to it; advise --scheme "
                 "modelopt:MXFP4_DEFAULT_CFG measures that export's arithmetic"),)


def _modelopt_absmax(fmt: Format, role: str, structure: str) -> dict[str, Any]:
    """The ModelOpt quantizer of an abs-max scale: per token (dynamic), per output channel or whole
    weight (static, max-calibrated), or static blocks of a weight."""
    grid = fmt.grid
    cfg: dict[str, Any] = ({"num_bits": grid.bits, "narrow_range": True} if grid.is_int
                           else {"num_bits": [grid.exponent_bits, grid.mantissa_bits]})
    if not grid.is_int and (grid.exponent_bits, grid.mantissa_bits) != (4, 3):
        raise Refused(f"ModelOpt takes {_element(fmt)} elements only in dynamic blocks under E8M0 scales; "
                      f"{fmt.name} scales them by their abs-max")
    if structure == "block":
        if role == ACTIVATIONS:
            raise Refused(f"ModelOpt's dynamic block scales are E8M0 (MX) or E4M3 (NVFP4), and its "
                          f"static ones are calibrated; {fmt.name} takes each block's abs-max as it comes")
        return cfg | {"block_sizes": {-1: fmt.block_size, "type": "static"}}
    if structure == "token":
        return cfg | {"axis": None, "type": "dynamic", "block_sizes": {-1: None}}
    return cfg | {"axis": 0 if structure == "channel" else None}


def modelopt_cfg(fmt: Format, role: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The ModelOpt ``QuantizerAttributeConfig`` fields that quantize ``role`` exactly as ``fmt``, and
    the notes on what differs below the format; raises :class:`Refused` where none do."""
    structure = _structure(fmt, role, MODEL_OPT)
    grid, form = fmt.grid, fmt.rule.form
    if form.e8m0:
        return _modelopt_mx(fmt)
    if form is Form.NVFP4:
        if role == ACTIVATIONS:
            raise _nvfp4_activations(fmt, MODEL_OPT)
        cfg = {"num_bits": [grid.exponent_bits, grid.mantissa_bits],
               "block_sizes": {-1: fmt.block_size, "type": "dynamic", "scale_bits": [4, 3]}}
        return cfg, (_nvfp4_block_note(fmt, MODEL_OPT),
                     (f"{fmt.name}: ModelOpt fake-quantizes NVFP4 only in CUDA kernels, and its export "
                      "(NVFP4QTensor) divides by the E4M3 block scale times amax / 2688, clamping that scale "
                      "to 2^-9; advise --scheme modelopt:NVFP4_DEFAULT_CFG measures that arithmetic"))
    cfg = _modelopt_absmax(fmt, role, structure)
    if grid.is_int:
        how = (f"{fmt.name}: ModelOpt rounds x * (qmax / amax) and divides back by qmax / amax "
               "(tensor_quant._tensor_quant, float32); kernelscope divides by the step amax / qmax and "
               "multiplies back, so an integer code differs only where the two quotients straddle a half, "
               "and a dequantized value may differ in its last bit")
        theirs = "quantizes it with its own abs-max (to zero below 2^-24)"
    else:
        how = (f"{fmt.name}: ModelOpt scales by 448 / amax and back by its float32 reciprocal "
               "(tensor_quant._fp8_eager); kernelscope divides by amax / 448 and multiplies back, so a "
               "dequantized value may differ in its last bit")
        theirs = "scales it by its own abs-max (by 1 below 2^-24)"
    return cfg, (how, *_floor_note(fmt, MODEL_OPT, theirs))


modelopt_exclusions = quant_cfg.exclusions


@dataclass(frozen=True)
class ModelOptPreset:
    name: str
    weights: dict[str, Any]
    input_activations: dict[str, Any]
    algorithm: str | None


_MX = {"block_sizes": {-1: MX_BLOCK, "type": "dynamic", "scale_bits": [8, 0]}}
_NV = {"effective_bits": 4.5, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": [4, 3]}}
"""ModelOpt's NVFP4 blocks; ``effective_bits`` (4.5) is what its preset states for AutoQuantize's cost, not
arithmetic."""
MODELOPT_PRESETS = (
    ModelOptPreset("INT8_DEFAULT_CFG", {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}, "max"),
    ModelOptPreset("FP8_DEFAULT_CFG", {"num_bits": [4, 3], "axis": None}, {"num_bits": [4, 3], "axis": None},
                   "max"),
    ModelOptPreset("FP8_PER_CHANNEL_PER_TOKEN_CFG", {"num_bits": [4, 3], "axis": 0},
                   {"num_bits": [4, 3], "axis": None, "type": "dynamic", "block_sizes": {-1: None}}, "max"),
    ModelOptPreset("NVFP4_DEFAULT_CFG", {"num_bits": [2, 1], **_NV}, {"num_bits": [2, 1], **_NV}, "max"),
    ModelOptPreset("MXFP8_DEFAULT_CFG", {"num_bits": [4, 3], **_MX}, {"num_bits": [4, 3], **_MX}, None),
    ModelOptPreset("MXFP6_DEFAULT_CFG", {"num_bits": [3, 2], **_MX}, {"num_bits": [3, 2], **_MX}, None),
    ModelOptPreset("MXFP4_DEFAULT_CFG", {"num_bits": [2, 1], **_MX}, {"num_bits": [2, 1], **_MX}, None),
)
"""ModelOpt's model presets (``mtq.<NAME>``) whose weight and input quantizers a kernelscope format can
be: each is every quantizer off, these two entries for ``*weight_quantizer`` and ``*input_quantizer``,
then :func:`modelopt_exclusions`."""


# -- what a scheme deploys as --------------------------------------------------------------------------

@dataclass(frozen=True)
class Export:
    """What one library gets for a scheme: the arguments of its weight and input quantizers (fields of
    compressed-tensors' ``QuantizationArgs`` or ModelOpt's ``QuantizerAttributeConfig``), or the reason
    it gets none. ``preset``: the library's preset of the same arguments; ``algorithm``: ModelOpt's
    calibration; ``notes``: what differs below the format; ``account``: each role's format in words."""

    library: str
    weights: dict[str, Any] | None = None
    input_activations: dict[str, Any] | None = None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    preset: str | None = None
    algorithm: str | dict[str, Any] | None = None
    account: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Deployment:
    """A scheme as each deploying library would quantize it."""

    llmcompressor: Export
    modelopt: Export


TRANSLATORS = {LLM_COMPRESSOR: llmcompressor_args, MODEL_OPT: modelopt_cfg}
HINTS = {LLM_COMPRESSOR: " (advise --scheme llm-compressor:NAME measures one of its presets in its own "
                         "arithmetic, and writes that recipe)", MODEL_OPT: ""}
"""What a refused library's reason adds: where a scheme in that library's own arithmetic exists."""


def _translate(library: str, scheme, weights: Format, activations: Format) -> Export:
    """One library's export of a scheme quantizing weights and activations in these formats."""
    found: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for role, fmt in ((WEIGHTS, weights), (ACTIVATIONS, activations)):
        try:
            found[role], more = TRANSLATORS[library](fmt, role)
        except Refused as exc:
            return Export(library, reason=f"{library} cannot quantize {scheme.name}'s {_role(role)} as "
                                          f"measured: {exc}{HINTS[library]}")
        notes += [n for n in more if n not in notes]
    export = Export(library, found[WEIGHTS], found[ACTIVATIONS], notes=tuple(notes),
                    account=(_account(weights, WEIGHTS), _account(activations, ACTIVATIONS)))
    return _with_preset(export)


SCALES = {Form.ABSMAX: "abs-max", Form.E8M0_FLOOR: "E8M0 (power of two, OCP FLOOR)",
          Form.E8M0_RCEIL: "E8M0 (power of two, RCEIL)", Form.NVFP4: "E4M3 block (under a tensor scale)"}
UNITS = {"token": "per token, from each token as it comes", "channel": "per output channel",
         "tensor": "per weight", "block": "per block of {g} inputs"}


def _account(fmt: Format, role: str) -> str:
    """A role's format in words, for a file's comments: element, scale, unit, when scales are taken."""
    unit = UNITS[_structure(fmt, role, "")].format(g=fmt.block_size)
    when = ", from each tensor as it comes" if role == ACTIVATIONS and fmt.is_block else ""
    scale = SCALES[fmt.rule.form]
    return f"{_role(role)}: {fmt.name}, {_element(fmt)} elements, one {scale} scale {unit}{when}"


def _with_preset(export: Export) -> Export:
    """``export`` with the library's preset of the same arguments named (and ModelOpt's algorithm)."""
    pair = (export.weights, export.input_activations)
    if export.library == LLM_COMPRESSOR:
        from kernelscope.quant.targets import LLM_COMPRESSOR as LIBRARY
        from kernelscope.quant.targets import TARGETS

        name = next((t.name for t in TARGETS.values() if t.library == LIBRARY and pair == (
            t.weights and t.weights.as_dict(), t.input_activations and t.input_activations.as_dict())), None)
        return replace(export, preset=name)
    preset = next((p for p in MODELOPT_PRESETS if (p.weights, p.input_activations) == pair), None)
    if preset is not None:
        return replace(export, preset=preset.name, algorithm=preset.algorithm)
    return replace(export, algorithm="max" if any(map(_calibrated, pair)) else None)


def _calibrated(cfg: dict[str, Any]) -> bool:
    """Whether a ModelOpt quantizer has a static amax to calibrate (by ``max``, ModelOpt's default): all
    but dynamic per-token scales and MX blocks (NVFP4's dynamic blocks sit under a calibrated amax)."""
    blocks = cfg.get("block_sizes") or {}
    return cfg.get("type") != "dynamic" and blocks.get("scale_bits") != [8, 0]


def _everywhere(reason: str) -> Deployment:
    return Deployment(Export(LLM_COMPRESSOR, reason=reason), Export(MODEL_OPT, reason=reason))


def _modelopt_target_cfg(args) -> dict[str, Any] | None:
    """A ModelOpt target's quantizer as ModelOpt's ``QuantizerAttributeConfig`` fields."""
    if args is None:
        return None
    if args.group_size is not None:  # NVFP4 (E4M3 block scales) or MXFP4 (E8M0)
        blocks = _NV if args.scale_dtype == "float8_e4m3fn" else _MX
        return {"num_bits": [2, 1], **_copy(blocks)}
    cfg: dict[str, Any] = {"num_bits": [4, 3] if args.kind == "float" else args.num_bits,
                           "axis": 0 if args.strategy == "channel" else None}
    if args.strategy == "token":
        cfg |= {"type": "dynamic", "block_sizes": {-1: None}}
    return cfg


def _target_deployment(scheme, target) -> Deployment:
    """A scheme that computes a library's own arithmetic: that library's arguments, exactly."""
    if target.library != LLM_COMPRESSOR:
        own = _with_preset(Export(MODEL_OPT, _modelopt_target_cfg(target.weights),
                                  _modelopt_target_cfg(target.input_activations),
                                  account=(f"{scheme.name}: ModelOpt's own configuration",)))
        if target.smoothquant_alpha is not None:  # a preset by the target's name; a user's file is none
            own = replace(own, preset=target.name if target.coverage is None else None,
                          algorithm={"method": "smoothquant", "alpha": target.smoothquant_alpha})
        other = Export(LLM_COMPRESSOR, reason=f"{scheme.name} is ModelOpt's own arithmetic, which "
                                              "compressed-tensors' is not")
        return Deployment(other, own)
    account = tuple(f"{_role(role)}: " + (f"{target.label}'s {args.label}" if args else "full precision")
                    for role, args in ((WEIGHTS, target.weights), (ACTIVATIONS, target.input_activations)))
    export = Export(LLM_COMPRESSOR, target.weights and target.weights.as_dict(),
                    target.input_activations and target.input_activations.as_dict(), account=account)
    other = Export(MODEL_OPT, reason=f"{scheme.name} is {LLM_COMPRESSOR}'s own arithmetic, which "
                                     "ModelOpt's is not")
    return Deployment(_with_preset(export), other)


def deployment(scheme, transform=None) -> Deployment:
    """How each library would quantize ``scheme`` (a :class:`~kernelscope.runs.schemes.Scheme`)
    quantizing in the basis of ``transform`` (a :class:`~kernelscope.quant.transforms.TransformSpec`,
    its own transform included; None: the scheme's own alone)."""
    if not scheme.mode.deployable:
        return _everywhere(f"{scheme.name} is a measurement, not a quantizer a tool deploys")
    basis = scheme.transform if transform is None else transform
    if scheme.target is not None and basis == scheme.transform:  # a library's own (smoothquant)
        return _target_deployment(scheme, scheme.target)
    if not basis.is_identity:
        return _everywhere(f"{scheme.name} quantizes in the {basis.label} basis, which kernelscope fits to "
                           "every Linear on its own; llm-compressor's SmoothQuant and rotation modifiers "
                           "and ModelOpt's smoothquant algorithm transform differently, so no file is "
                           "written")
    weights = scheme.weight_quantizer
    if weights is None:
        return _everywhere(f"{scheme.name} leaves the weights in full precision, which no "
                           "activation-only scheme of a deploying library mirrors")
    fmts = weights.format, scheme.activation.format
    return Deployment(*(_translate(lib, scheme, *fmts) for lib in (LLM_COMPRESSOR, MODEL_OPT)))


def modelopt_for(export: Export, quantized: Iterable[str]) -> Export:
    """``export`` refused where ModelOpt's default exclusions, which its file keeps, would turn off a
    Linear the plan quantizes (an ``lm_head`` the measurement covered, a router)."""
    if not export.ok:
        return export
    patterns = quant_cfg.DEFAULT_EXCLUDED
    hit = [n for n in quantized
           if any(fnmatch.fnmatchcase(f"{n}.{q}", p) for p in patterns for q in _QUANTIZERS)]
    if not hit:
        return export
    return replace(export, reason=f"ModelOpt's default exclusions, which its config keeps, turn off "
                                  f"{', '.join(hit)}, which the plan quantizes")


# -- writing --------------------------------------------------------------------------------------

_QUANTIZERS = ("weight_quantizer", "input_quantizer")


def _yaml(body: Any) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # every entry written out in full
            return True

    return yaml.dump(body, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)


def _comments(lines: Iterable[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


def recipe(export: Export, ignore: Sequence[str]) -> dict[str, Any]:
    """The llm-compressor recipe as a dict (ready for YAML): explicit arguments for both roles."""
    group: dict[str, Any] = {"targets": ["Linear"]}
    for role in (WEIGHTS, ACTIVATIONS):
        if getattr(export, role) is not None:
            group[role] = dict(getattr(export, role))
    modifier = {"targets": ["Linear"], "config_groups": {"group_0": group}, "ignore": list(ignore)}
    return {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}


def recipe_yaml(export: Export, ignore: Sequence[str], header: Sequence[str]) -> str:
    """``recipe.yaml``: comment lines (``header``, what the arguments are, the notes), then the recipe."""
    same = (f"these arguments are llm-compressor's preset {export.preset}" if export.preset else
            "no llm-compressor preset has these arguments")
    lines = [*header, f"{same} (checked against {CHECKED[LLM_COMPRESSOR]})",
             *export.account, "ignore: lm_head, the kept layers and any Linear the measurement did not cover",
             *(f"note: {n}" for n in export.notes)]
    return _comments(lines) + _yaml(recipe(export, ignore))


def modelopt_config(export: Export, quantized: Sequence[str], full_precision: Sequence[str]
                    ) -> dict[str, Any]:
    """The ModelOpt ``QuantizeConfig`` as a dict: every quantizer off, each quantized Linear's weight and
    input quantizer by name, ModelOpt's default exclusions, then each full-precision Linear off."""
    cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name in quantized:
        for quantizer, args in zip(_QUANTIZERS, (export.weights, export.input_activations), strict=True):
            cfg.append({"quantizer_name": f"{glob.escape(name)}.{quantizer}", "cfg": _copy(args)})
    cfg += modelopt_exclusions()
    cfg += [{"quantizer_name": f"{glob.escape(name)}.*", "enable": False} for name in full_precision]
    return {"quant_cfg": cfg, "algorithm": export.algorithm}


def _copy(value: Any) -> Any:
    """A deep copy of plain data (dicts, lists, scalars), so no two entries share an object."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


MODELOPT_SCHEMA = "modelopt.torch.quantization.config.QuantizeConfig"


def modelopt_yaml(export: Export, quantized: Sequence[str], full_precision: Sequence[str],
                  header: Sequence[str]) -> str:
    """``modelopt_quant_cfg.yaml``: comment lines, ModelOpt's schema line, then the config."""
    base = (f"the quantizers of mtq.{export.preset}" if export.preset else
            "quantizers no ModelOpt preset combines")
    lines = [*header, (f"a ModelOpt QuantizeConfig ({CHECKED[MODEL_OPT]}) with {base}, each quantized Linear "
             "named; load it with mtq.quantize(model, yaml.safe_load(open(path)), forward_loop) or "
             "modelopt.torch.opt.config_loader.load_config(path)"),
             *export.account, *(f"note: {n}" for n in export.notes), f"modelopt-schema: {MODELOPT_SCHEMA}"]
    return _comments(lines) + _yaml(modelopt_config(export, quantized, full_precision))


def modules_text(names: Iterable[str]) -> str:
    return "".join(f"{name}\n" for name in names)


# -- reading back: eval --ignore @FILE ---------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class IgnoreSpec:
    """Module names to leave in full precision, as a file gave them: exact names, ``re:`` regular
    expressions (llm-compressor's spelling, matched from the start of the name), and ModelOpt
    ``quant_cfg`` entries applied in order (a Linear both of whose quantizers end off)."""

    source: str
    names: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    entries: tuple[quant_cfg.Entry, ...] = ()

    def resolve(self, modules: dict[str, str]) -> list[str]:
        """The module names (of ``modules``: name -> class name) this spec selects; a name or class
        the model does not have is refused."""
        chosen: set[str] = set()
        classes = set(modules.values())
        for name in self.names:
            if name in modules:
                chosen.add(name)
            elif name in classes:  # llm-compressor also ignores by module class
                chosen |= {n for n, c in modules.items() if c == name}
            else:
                raise KernelscopeError(f"{self.source} names {name!r}, which is no Linear layer of this "
                                       "model; list them with `kernelscope layers MODEL --include-lm-head`")
        for rx in self.regexes:
            chosen |= {n for n in modules if re.match(rx, n)}
        if self.entries:
            chosen |= {n for n, c in modules.items() if not self._quantized(n, c)}
        return sorted(chosen)

    def _quantized(self, name: str, module_class: str) -> bool:
        """Whether ModelOpt, applying the entries in order to a Linear's quantizers (on by default),
        leaves them on; a Linear with one on and one off is refused (a layer is kept or not)."""
        states = [quant_cfg.state(self.entries, f"{name}.{quantizer}", (module_class,), True)[0]
                  for quantizer in _QUANTIZERS]
        if states[0] != states[1]:
            raise KernelscopeError(f"{self.source} turns {'on' if states[0] else 'off'} only the weight "
                                   f"quantizer of {name}; kernelscope keeps whole layers in full precision")
        return states[0]


def read_ignore_file(path: str | Path, shown: str) -> IgnoreSpec:
    """The layers an advice file keeps in full precision: an advice folder or its ``summary.json``, an
    llm-compressor recipe, a ModelOpt config (YAML, or JSON ``quant_cfg`` in either of ModelOpt's
    forms), or a list of module names one a line (``#`` starts a comment). ``shown`` is how the option
    names the file in errors."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = summary_of(file) or file / SUMMARY
    if not file.is_file():
        raise KernelscopeError(f"{shown}: {file} does not exist; give an advice folder or one of its files "
                               f"({SUMMARY}, {', '.join(EXPORT_NAMES)})")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KernelscopeError(f"{shown}: {file} cannot be read as text ({exc})") from None
    if file.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(text, shown)
    if file.suffix.lower() == ".json":
        return _from_json(text, shown)
    return _from_list(text, shown)


def _not_advice(shown: str, why: str) -> KernelscopeError:
    return KernelscopeError(f"{shown} is not an advice file: {why}")


def _from_yaml(text: str, shown: str) -> IgnoreSpec:
    import yaml

    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _not_advice(shown, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(body, dict) and "quant_cfg" in body:
        return _from_quant_cfg(body["quant_cfg"], shown)
    found = _find_key(body, "QuantizationModifier")
    if not isinstance(found, dict) or not isinstance(found.get("ignore", []), list):
        raise _not_advice(shown, "no QuantizationModifier with an ignore list, nor a ModelOpt quant_cfg")
    entries = [str(e) for e in found.get("ignore", [])]
    return IgnoreSpec(shown, names=tuple(e for e in entries if not e.startswith("re:")),
                      regexes=tuple(e.removeprefix("re:") for e in entries if e.startswith("re:")))


def _find_key(body: Any, key: str) -> Any:
    if isinstance(body, dict):
        if key in body:
            return body[key]
        for value in body.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _from_json(text: str, shown: str) -> IgnoreSpec:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _not_advice(shown, f"not valid JSON ({exc.msg})") from None
    if isinstance(body, dict) and body.get("kind") == "advise":
        names = (body.get("plan") or {}).get("full_precision_modules")
        if not isinstance(names, list):
            raise _not_advice(shown, "its plan lists no full_precision_modules")
        return IgnoreSpec(shown, names=tuple(map(str, names)))
    if isinstance(body, dict) and isinstance(body.get("quant_cfg"), (dict, list)):
        return _from_quant_cfg(body["quant_cfg"], shown)
    raise _not_advice(shown, "neither an advise summary (kind advise) nor a ModelOpt quant_cfg")


def _from_quant_cfg(cfg: Any, shown: str) -> IgnoreSpec:
    """A ModelOpt ``quant_cfg``, in either of its forms (:func:`kernelscope.quant.quant_cfg.entries`)."""
    try:
        return IgnoreSpec(shown, entries=quant_cfg.entries(cfg))
    except ValueError as exc:
        raise _not_advice(shown, str(exc)) from None


def _from_list(text: str, shown: str) -> IgnoreSpec:
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    bad = next((n for n in names if not _NAME.match(n)), None)
    if bad is not None:
        raise _not_advice(shown, f"{bad[:60]!r} is not a module name (one name a line)")
    return IgnoreSpec(shown, names=tuple(names))  # empty: a plan that keeps no layer
