"""Evaluation schemes by name: ``fp``, ``w8a8-crossquant``, ``w4a8-g128-per-token``,
``w8a8-smoothquant``, ``remove-kernel-per-token``, ...

A scheme says how every decoder Linear's activation and weight are treated during a forward pass.
``wXaY-smoothquant`` is ``wXaY-per-token`` with the ``smoothquant`` transform of
:mod:`kernelscope.quant.transforms` as its own; any other transform is given beside the scheme.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kernelscope.data.recipes import read_modelopt_config, read_recipe
from kernelscope.errors import KernelscopeError
from kernelscope.quant import (
    DEFAULT_ALPHA,
    MAX_BITS,
    MIN_BITS,
    QuantizerConfig,
    check_alpha,
    qmax_for_bits,
    targets,
)
from kernelscope.quant.formats import FORMATS
from kernelscope.quant.modes import Mode
from kernelscope.quant.targets import LLM_COMPRESSOR, MODELOPT, TARGETS, Target, get_target
from kernelscope.quant.transforms import (
    IDENTITY,
    MODELOPT_SMOOTHQUANT,
    SMOOTHQUANT_ALPHA,
    TRANSFORMS,
    TransformSpec,
    TransformStep,
)

_REMOVE = "remove-kernel-"

QUANTIZER_WORDS = {name.replace("_", "-"): name for name, entry in FORMATS.items()
                   if entry.grid is None and entry.block_size is None}
"""The INT quantizers a ``wXaY-QUANTIZER`` scheme names: every INT format of the registry whose scale
needs no block size of its own (per-token, per-tensor, per-channel, crossquant)."""
TRANSFORM_WORDS = {"smoothquant": ("per_token", "smoothquant")}
"""``wXaY-WORD`` schemes that name a quantizer with a transform of their own (its value
``smooth_alpha``): SmoothQuant is per-token INT after the ``smoothquant`` transform."""
_FAKE = re.compile(r"^w(\d+)a(\d+)(?:-g(\d+))?-(" + "|".join([*QUANTIZER_WORDS, *TRANSFORM_WORDS]) + ")$")
FORMAT_WORDS = {name.replace("_", "-"): name for name in FORMATS}
"""Every quantizer of the formats registry, as a scheme spells it (``remove-kernel-mxfp4-rceil``)."""
FLOAT_SCHEMES = {name.replace("_", "-"): name for name, entry in FORMATS.items() if entry.grid is not None}
FLOAT_SCHEMES["fp8"] = "fp8_per_token"  # llm-compressor's FP8_DYNAMIC: weights per channel, tokens dynamic
"""Schemes that quantize weights and activations in one float format (the weight as one sequence
whose rows are output channels, blocks along the input axis)."""

EXAMPLES = ("fp", "w8a8-per-token", "w8a8-crossquant", "w4a8-g128-per-token", "w4a8-g128-crossquant",
            "w4a4-per-token", "w4a4-crossquant", "w8a8-smoothquant", "fp8", "mxfp8", "mxfp4", "nvfp4",
            "remove-kernel-per-token", "remove-kernel-crossquant", "remove-kernel-mxfp4")


@dataclass(frozen=True)
class Scheme:
    """How activations and weights of the covered Linear layers are treated.

    ``mode``: ``fp`` (untouched), ``fake_quant`` (activations quantized and dequantized) or
    ``remove_kernel`` (only the kernel of ``activation`` zeroed, at ``kernel_scale`` = λ times its
    zero bound). ``weight_bits`` None keeps weights in full precision; ``group_size`` None is
    per-output-channel. ``transform`` is the scheme's own change of basis before quantization
    (``smoothquant:α`` for ``wXaY-smoothquant``); a transform given for a run follows it.
    ``target`` is a deploying library's scheme (``llm-compressor:W8A8``), computed with that library's
    arithmetic instead of the paper's formats (:mod:`kernelscope.quant.targets`).
    """

    name: str
    mode: Mode
    activation: QuantizerConfig | None = None
    weight_bits: int | None = None
    group_size: int | None = None
    transform: TransformSpec = IDENTITY
    kernel_scale: float = 1.0
    weight_format: QuantizerConfig | None = None  # a format of the registry for the weights instead
    target: Target | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))  # a mode given by its table value reads the same

    @property
    def changes_weight(self) -> bool:
        if self.target is not None:  # removing a target's kernel leaves the weights alone
            return self.target.weights is not None and not self.mode.removes_kernel
        return self.weight_quantizer is not None

    @property
    def changes_activation(self) -> bool:
        """True when the scheme changes the activations it covers (a weight-only target does not)."""
        if self.target is not None:
            return self.target.quantizes_activations
        return self.mode.quantizes

    @property
    def needs_calibration(self) -> bool:
        """True when an activation scale is calibrated on calibration windows first (a static target)."""
        return self.target is not None and self.target.needs_calibration

    def calibrates(self, transform: TransformSpec) -> bool:
        """True when the scheme under ``transform`` needs calibration windows: for a calibrated step of
        its basis (SmoothQuant) or for its own static scales."""
        return self.transform.then(transform).needs_calibration or self.needs_calibration

    @property
    def weight_quantizer(self) -> QuantizerConfig | None:
        """How weights are quantized: ``weight_format``, or INT at ``weight_bits`` per output channel
        (``per_token`` on a weight ``(O, I)``) or per ``group_size`` inputs; None for full precision."""
        if self.weight_format is not None or self.weight_bits is None:
            return self.weight_format
        if self.group_size is None:
            return QuantizerConfig("per_token", self.weight_bits)
        return QuantizerConfig("per_group", self.weight_bits, block_size=self.group_size)

    def describe(self) -> dict:
        if self.target is not None:
            return self._describe_target()
        act, wf = self.activation, self.weight_format
        return {
            "scheme": self.name, "mode": self.mode,
            "activation_quantizer": act.quantizer if act else None,
            "activation_bits": act.bits if act else None,
            "activation_format": act.label if act else None,
            "alpha": act.alpha if act else None,
            "weight_bits": wf.bits if wf else self.weight_bits, "group_size": self.group_size,
            "weight_format": wf.label if wf else None,
            "kernel_scale": self.kernel_scale if self.mode.removes_kernel else None,
            "arithmetic": "kernelscope",
        }

    def kernel_refusal(self, transforms, command: str, shown: str | None = None) -> str | None:
        """Why ``command`` (``profile``, ``search``) cannot take this deployment target's activation kernel
        under ``transforms``: it quantizes no activation, or it deploys in the model's own basis; None
        where it can (and for a scheme that is no target). ``shown``: the name as the user typed it."""
        if self.target is None:
            return None
        name = shown or self.name
        if not self.target.quantizes_activations:
            return f"{name} leaves activations in full precision: it has no activation kernel to {command}"
        if not all(t.is_identity for t in transforms):
            return f"{name} deploys in the model's own basis; {command} it without --transform"
        if not self.transform.is_identity:
            return (f"{name} smooths each layer's input first ({self.transform.label}), which {command} "
                    "does not apply; measure it with eval")
        return None

    def check_widths(self, layers) -> None:
        """Refuse a target whose groups do not divide a covered layer's inputs (the library refuses
        it too), naming the first such layer."""
        if self.target is None:
            return
        for args in (self.target.weights, self.target.input_activations):
            group = args.group_size if args is not None else None
            bad = [layer.name for layer in layers if group and layer.in_features % group]
            if bad:
                which, them = ((f"the {len(bad)} layers' inputs of {bad[0]}, ...", "them") if len(bad) > 1
                               else (f"the inputs of {bad[0]}", "it"))
                raise KernelscopeError(f"{self.name} quantizes groups of {group} inputs, which do not divide "
                                       f"{which}; keep {them} in full precision with --ignore")

    def check_fused(self, layers, present: Iterable[str], selected: Iterable[str]) -> None:
        """Refuse a target that gives a fused group's NVFP4 weights one global scale where it quantizes
        only part of the group (of the module names ``present``) and its library cannot; and ModelOpt's
        smoothquant where its ``layers`` leave out part of a fused group of the ``selected`` (whose mean
        pre_quant_scale its export takes over the quantized members, which is not modelled)."""
        if self.target is not None and self.target.smoothquant_alpha is not None:
            split = targets.split_fused_groups((layer.name for layer in layers), selected)
            if split:
                raise KernelscopeError(f"{self.name} quantizes only part of {', '.join(split[0])}, whose "
                                       "smoothing ModelOpt's export merges over the quantized ones, which is "
                                       "not modelled; quantize or --ignore the whole group")
        weights = self.target.weights if self.target is not None else None
        if weights is None or weights.strategy is not targets.Strategy.TENSOR_GROUP:
            return
        if weights.arithmetic.fuses_part_of_a_group:
            return
        split = targets.split_fused_groups((layer.name for layer in layers), present)
        if split:
            raise KernelscopeError(f"{self.name} gives {', '.join(split[0])} one NVFP4 weight scale, as vLLM "
                                   f"runs them as one matrix, and {self.target.library} stops with an "
                                   "assertion when only part of them is quantized; quantize or --ignore the "
                                   "whole group")

    def _describe_target(self) -> dict:
        act, w = self.target.input_activations, self.target.weights
        return {
            "scheme": self.name, "mode": self.mode, "activation_quantizer": None,
            "activation_bits": act.num_bits if act else None,
            "activation_format": act.label if act else None, "alpha": None,
            "weight_bits": w.num_bits if w else None, "group_size": w.group_size if w else None,
            "weight_format": w.label if w else None, "kernel_scale": None,
            "arithmetic": self.target.checked,
        }


def scheme_of(config: QuantizerConfig, weight_bits: int | None, group_size: int | None = None) -> Scheme:
    """The scheme that quantizes activations with ``config``: a float format quantizes the weights in
    the same format (its scheme of :data:`FLOAT_SCHEMES`); an INT quantizer is ``wXaY[-gG]-QUANTIZER``
    with INT weights at ``weight_bits``, per output channel or per ``group_size`` inputs."""
    if not config.format.grid.is_int:
        return Scheme(config.quantizer.replace("_", "-"), Mode.FAKE_QUANT, config, weight_format=config)
    group = f"-g{group_size}" if group_size else ""
    word = config.quantizer.replace("_", "-") + (f"{config.block_size}" if config.format.is_block else "")
    return Scheme(f"w{weight_bits}a{config.bits}{group}-{word}", Mode.FAKE_QUANT, config, weight_bits,
                  group_size)


def _target_scheme(text: str) -> Scheme:
    """``LIBRARY:NAME`` (a library's preset, any case), ``llm-compressor:@FILE`` (a user's recipe) or
    ``modelopt:@FILE`` (a user's ModelOpt config), the path as typed."""
    if ":@" in text:
        library, _, path = text.partition(":@")
        readers = {LLM_COMPRESSOR: read_recipe, MODELOPT: read_modelopt_config}
        if library.lower() not in readers:
            raise ValueError(f"a file is read for {' and '.join(readers)} only ({library}:@FILE given)")
        target = readers[library.lower()](path)
    else:
        target = get_target(text)
    own = IDENTITY if target.smoothquant_alpha is None else TransformSpec(
        (TransformStep(MODELOPT_SMOOTHQUANT, target.smoothquant_alpha),))
    return Scheme(target.label, Mode.FAKE_QUANT, target=target, transform=own)


def parse_scheme(
    text: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    bits: int = 8,
    weight_bits: int | None = None,
    group_size: int | None = None,
    smooth_alpha: float = SMOOTHQUANT_ALPHA,
) -> Scheme:
    """Parse a scheme name. ``alpha`` is CrossQuant's exponent; ``bits`` (INT quantizers),
    ``weight_bits`` and ``group_size`` apply to ``remove-kernel-*`` (whose name carries no bit widths).
    A float format's scheme (``fp8``, ``mxfp4``, ``nvfp4``, ...) quantizes weights and activations in
    that format."""
    name = text.strip().lower()
    try:
        if ":" in name:
            return _target_scheme(text.strip())
        if name == "fp":
            return Scheme("fp", Mode.FP)
        if m := _FAKE.match(name):
            wbits, abits, group, kind = int(m[1]), int(m[2]), m[3], m[4]
            for part, letter, width in (("weights", "w", wbits), ("activations", "a", abits)):
                if not MIN_BITS <= width <= MAX_BITS:
                    raise ValueError(f"the {part}' width, {letter}{width}, is out of range; wXaY takes "
                                     f"{MIN_BITS} to {MAX_BITS} bits for the weights (X) and the "
                                     "activations (Y)")
            if group is not None and int(group) < 1:
                raise ValueError("the group size gG must be at least 1")
            own = IDENTITY
            if kind in TRANSFORM_WORDS:
                quantizer, transform = TRANSFORM_WORDS[kind]
                own = TransformSpec((TransformStep(TRANSFORMS[transform], check_alpha(smooth_alpha)),))
            else:
                quantizer = QUANTIZER_WORDS[kind]
            takes_alpha = FORMATS[quantizer].takes_alpha
            act = QuantizerConfig(quantizer, abits, alpha if takes_alpha else None)
            return Scheme(name, Mode.FAKE_QUANT, act, wbits, int(group) if group else None, transform=own)
        if name in FLOAT_SCHEMES:
            config = QuantizerConfig(FLOAT_SCHEMES[name], FORMATS[FLOAT_SCHEMES[name]].grid.bits)
            return Scheme(name, Mode.FAKE_QUANT, config, weight_format=config)
        if name.startswith(_REMOVE) and name.removeprefix(_REMOVE) in FORMAT_WORDS:
            quantizer = FORMAT_WORDS[name.removeprefix(_REMOVE)]
            entry = FORMATS[quantizer]
            act = QuantizerConfig(quantizer, bits if entry.grid is None else entry.grid.bits,
                                  alpha if entry.takes_alpha else None)
            if weight_bits is not None:
                qmax_for_bits(weight_bits)
            return Scheme(name, Mode.REMOVE_KERNEL, act, weight_bits, group_size)
    except ValueError as exc:
        raise KernelscopeError(f"--scheme {text.strip()}: {exc}") from None
    raise KernelscopeError(
        f"unknown scheme {text!r}; use fp, wXaY[-gG]-QUANTIZER (QUANTIZER: per-token, crossquant, "
        f"per-tensor, per-channel, smoothquant), a float format ({', '.join(FLOAT_SCHEMES)}) or "
        "remove-kernel-QUANTIZER (any -q quantizer), a deploying library's scheme (LIBRARY:NAME, e.g. "
        f"llm-compressor:W8A8; {len(TARGETS)} known), e.g. " + ", ".join(EXAMPLES[1:4])
    )
