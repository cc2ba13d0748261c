"""A user's ModelOpt config as a deployment target: its quantizers' attributes as kernelscope's
:class:`~kernelscope.quant.targets.Args` under ModelOpt's arithmetic, and the Linear layers it quantizes,
each checked to be quantized the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kernelscope.quant import targets as T
from kernelscope.quant.quant_cfg import (
    BMM,
    INPUT,
    LINEAR_CLASSES,
    OUTPUT,
    WEIGHT,
    Entry,
    Reach,
    entries,
    state,
)
from kernelscope.quant.transforms import MODELOPT_SMOOTHQUANT

_IGNORED = {"effective_bits", "trt_high_precision_dtype", "pass_through_bwd"}
"""Attributes that change neither a fake-quantized value nor a scale (a cost hint, an export dtype, the
backward pass)."""
_DEFAULTS = {"fake_quant": True, "unsigned": False, "learn_amax": False, "bias": None, "rotate": False,
             "backend": None, "backend_extra_args": None, "use_constant_amax": False, "constant_amax": None,
             "calibrator": "max"}
"""Attributes kernelscope models only at ModelOpt's default value."""
_READ = {"num_bits", "axis", "type", "block_sizes", "narrow_range"}
_FP8 = (4, 3)
_PER_ROW = {-1: None}


_E2M1 = (2, 1)
_SCALE_DTYPES = {(4, 3): "float8_e4m3fn", (8, 0): "uint8"}
_FP4_BLOCKS = ("NVFP4 ({-1: 16, type: dynamic, scale_bits: [4, 3]}) and MXFP4 ({-1: 32, type: dynamic, "
               "scale_bits: [8, 0]})")


def _fp4(cfg: Mapping[str, Any], role: str) -> T.Args | None:
    """ModelOpt's NVFP4 or MXFP4 quantizer (E2M1 elements in dynamic blocks) that ``cfg`` gives, or None
    for a quantizer of other elements; ValueError for E2M1 in any other blocks."""
    bits = cfg.get("num_bits")
    if not isinstance(bits, (list, tuple)) or tuple(bits) != _E2M1:
        return None
    blocks = cfg.get("block_sizes")
    if not isinstance(blocks, Mapping):
        raise ValueError(f"num_bits {list(bits)}: kernelscope models E2M1 elements in ModelOpt's "
                         f"{_FP4_BLOCKS} blocks only")
    shape = {k: v for k, v in blocks.items() if k not in ("type", "scale_bits")}
    scale_dtype = _SCALE_DTYPES.get(tuple(blocks.get("scale_bits") or ()))
    strategy = T.MODELOPT_BLOCKS.get((scale_dtype, shape.get(-1))) if set(shape) == {-1} else None
    if blocks.get("type") != "dynamic" or strategy is None or cfg.get("axis") is not None:
        raise ValueError(f"block_sizes {dict(blocks)!r}: kernelscope models ModelOpt's E2M1 blocks as "
                         f"{_FP4_BLOCKS} only")
    scaling = (T.Scaling.STATIC if role == WEIGHT else
               T.Scaling.LOCAL if strategy is T.Strategy.TENSOR_GROUP else T.Scaling.DYNAMIC)
    return T.modelopt_fp4(scale_dtype, shape[-1], scaling)


def _num_bits(cfg: Mapping[str, Any]) -> tuple[T.Kind, int]:
    bits = cfg.get("num_bits", 8)
    if isinstance(bits, (list, tuple)) and tuple(bits) == _FP8:
        return T.Kind.FLOAT, 8
    if isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8:
        return T.Kind.INT, bits
    raise ValueError(f"num_bits {bits!r}: kernelscope models ModelOpt's INT (2 to 8 bits), FP8 E4M3 (4, 3) "
                     "and E2M1 (2, 1) in NVFP4 or MXFP4 blocks")


def _structure(cfg: Mapping[str, Any], role: str) -> tuple[T.Strategy, T.Scaling]:
    """What one scale covers and when it is computed, from ``axis``, ``type`` and ``block_sizes``."""
    blocks, axis = cfg.get("block_sizes"), cfg.get("axis")
    dynamic = cfg.get("type", "static") == "dynamic"
    if blocks is not None:
        shape = {k: v for k, v in blocks.items() if k != "type"} if isinstance(blocks, Mapping) else blocks
        dynamic = dynamic or (isinstance(blocks, Mapping) and blocks.get("type") == "dynamic")
        if shape != _PER_ROW or axis is not None:
            raise ValueError(f"block_sizes {dict(blocks) if isinstance(blocks, Mapping) else blocks!r}: "
                             "kernelscope models ModelOpt's per-row scales ({-1: null}) only, not blocks")
        return (T.Strategy.CHANNEL if role == WEIGHT else T.Strategy.TOKEN), T.Scaling.DYNAMIC
    if cfg.get("type", "static") not in ("static", "dynamic"):
        raise ValueError(f"type {cfg['type']!r}: choose static or dynamic")
    if role == WEIGHT and axis in (0, None) and not dynamic:
        return (T.Strategy.TENSOR if axis is None else T.Strategy.CHANNEL), T.Scaling.STATIC
    if role == INPUT and axis is None and not dynamic:
        return T.Strategy.TENSOR, T.Scaling.STATIC
    raise ValueError(f"axis {axis!r} with type {'dynamic' if dynamic else 'static'} is not modelled for "
                     f"{role}s (weights: axis 0 or null, static; inputs: one static scale, or per token)")


def args_of(cfg: Mapping[str, Any] | list | None, role: str) -> T.Args:
    """The :class:`~kernelscope.quant.targets.Args` of a quantizer with ModelOpt attributes ``cfg``
    (None: the defaults, 8-bit INT per tensor); ValueError with the reason for any it does not model."""
    if isinstance(cfg, list):
        raise ValueError(f"a list of {role} configurations is ModelOpt's sequential quantization, which "
                         "is not modelled")
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - _READ - _IGNORED - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown quantizer attribute {unknown[0]!r}")
    changed = next((k for k, v in _DEFAULTS.items() if k in cfg and cfg[k] != v), None)
    if changed is not None:
        raise ValueError(f"{changed}: {cfg[changed]!r} is not modelled (kernelscope models "
                         f"{changed}: {_DEFAULTS[changed]!r})")
    fp4 = _fp4(cfg, role)
    if fp4 is not None:
        return fp4
    kind, bits = _num_bits(cfg)
    strategy, scaling = _structure(cfg, role)
    if role == WEIGHT and scaling is T.Scaling.DYNAMIC:  # a weight's per-row abs-max is its channels'
        scaling = T.Scaling.STATIC
    narrow = bool(cfg.get("narrow_range", False)) and kind is T.Kind.INT
    observer = "max" if scaling is T.Scaling.STATIC else None
    return T.Args(bits, kind, strategy, None, scaling, observer=observer, arithmetic=T.Arithmetic.MODELOPT,
                  narrow_range=narrow)


@dataclass(frozen=True)
class ModelOptCoverage(Reach):
    """The modules a ModelOpt config quantizes (:class:`~kernelscope.quant.quant_cfg.Reach`), each
    Linear checked to be quantized with the target's weight and input configurations."""

    weights: T.Args | None = None
    inputs: T.Args | None = None

    def covers(self, name: str, classes: tuple[str, ...]) -> bool:
        """True for a module some of whose quantizers end on; ValueError for a Linear the config
        quantizes otherwise than the rest."""
        reached = super().covers(name, classes)
        if not reached or not any(c in classes for c in LINEAR_CLASSES):
            return reached
        for role, expected in ((WEIGHT, self.weights), (INPUT, self.inputs)):
            on, cfg = state(self.entries, f"{name}.{role}", classes, True)
            if (args_of(cfg, role) if on else None) != expected:
                raise ValueError(f"it quantizes {name}'s {role} otherwise than the other layers' "
                                 "(kernelscope evaluates one configuration a file)")
        return True


_ALGORITHMS = (None, "max", "smoothquant")
_SMOOTHQUANT_ALPHA = MODELOPT_SMOOTHQUANT.default
"""The one α of ModelOpt's smoothquant kernelscope models (its default, INT8_SMOOTHQUANT_CFG's)."""


def _algorithm(value: Any) -> tuple[str | None, float | None]:
    """The calibration algorithm's name and, for smoothquant, its α; ValueError for any that is not max
    calibration (or none) or smoothquant at α 1."""
    method = value.get("method") if isinstance(value, Mapping) else value
    settings = set(value) - {"method", "alpha"} if isinstance(value, Mapping) else set()
    if isinstance(value, Mapping) and "alpha" in value and method != "smoothquant":
        settings.add("alpha")
    if settings:
        raise ValueError(f"algorithm settings {sorted(settings)} are not modelled")
    if method not in _ALGORITHMS:
        raise ValueError(f"algorithm {method!r} is not round-to-nearest with max calibration or smoothquant; "
                         "kernelscope does not run ModelOpt's other calibration algorithms")
    if method != "smoothquant":
        return method, None
    alpha = value.get("alpha", _SMOOTHQUANT_ALPHA) if isinstance(value, Mapping) else _SMOOTHQUANT_ALPHA
    if alpha != _SMOOTHQUANT_ALPHA:
        raise ValueError(f"smoothquant alpha {alpha!r} is not modelled (kernelscope models alpha "
                         f"{_SMOOTHQUANT_ALPHA:g}, ModelOpt's default)")
    return method, float(alpha)


def _nvfp4_beside_fp8(weights: T.Args | None, inputs: T.Args | None) -> bool:
    """NVFP4 weights with per-tensor FP8 inputs: ModelOpt's W4A8_NVFP4_FP8 export format."""
    return (weights is not None and inputs is not None and weights.strategy is T.Strategy.TENSOR_GROUP
            and inputs.kind is T.Kind.FLOAT and inputs.num_bits == 8 and inputs.strategy is T.Strategy.TENSOR)


def _smoothable(weights: T.Args | None, inputs: T.Args | None) -> bool:
    """Whether ModelOpt's smoothquant smooths layers so quantized: 8-bit INT weights and a static 8-bit
    INT input scale per tensor (it skips any other layer, which kernelscope does not model)."""
    return (weights is not None and inputs is not None and weights.kind is T.Kind.INT
            and weights.num_bits == 8 and inputs.kind is T.Kind.INT and inputs.num_bits == 8
            and inputs.strategy is T.Strategy.TENSOR and inputs.scaling is T.Scaling.STATIC)


def _role_args(found: tuple[Entry, ...], role: str) -> T.Args | None:
    """The one configuration the entries give the quantizers named ``role`` they turn on (None: they
    turn none on); ValueError when they give two."""
    enabling = [e for e in found if e.enable and e.reaches(role)]
    if not enabling:
        return None
    sources = [e.cfg for e in enabling if e.cfg is not None]
    if any(e.cfg is None for e in enabling):  # turned on with the attributes an earlier entry set
        sources += [e.cfg for e in found if e.reaches(role) and e.cfg is not None and not e.enable] or [None]
    distinct = {args_of(cfg, role) for cfg in sources}
    if len(distinct) > 1:
        labels = ", ".join(sorted(a.label for a in distinct))
        raise ValueError(f"it gives {role}s {len(distinct)} configurations ({labels}); kernelscope "
                         "evaluates one configuration a file")
    return distinct.pop()


def target_of(body: Any, name: str) -> T.Target:
    """The target a parsed ModelOpt ``QuantizeConfig`` (``{quant_cfg, algorithm}``) deploys."""
    if not isinstance(body, Mapping) or "quant_cfg" not in body:
        raise ValueError("it holds no quant_cfg (a ModelOpt QuantizeConfig: quant_cfg and algorithm)")
    if "imports" in body or "$import" in str(body):
        raise ValueError("it imports parts of ModelOpt's recipes ($import); give the expanded config, as "
                         "modelopt.torch.opt.config_loader.load_config returns it")
    unknown = sorted(set(body) - {"quant_cfg", "algorithm"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (a QuantizeConfig has quant_cfg and algorithm)")
    algorithm, alpha = _algorithm(body.get("algorithm", "max"))
    found = entries(body["quant_cfg"])
    if not found or found[0] != Entry("*", None, None, False):
        raise ValueError("its quant_cfg does not begin by turning every quantizer off ({quantizer_name: '*', "
                         "enable: false}), so ModelOpt's default 8-bit quantizers of embeddings, norms "
                         "and attention would stay on; kernelscope models Linear weight and input quantizers "
                         "only")
    reaching = next((e for e in found if e.enable and any(e.reaches(r) for r in (OUTPUT, *BMM))), None)
    if reaching is not None:
        raise ValueError(f"it turns on {reaching.pattern!r}, which reaches output or attention quantizers; "
                         "kernelscope models Linear weight and input quantizers only")
    weights, inputs = _role_args(found, WEIGHT), _role_args(found, INPUT)
    if weights is None and inputs is None:
        raise ValueError("it quantizes neither weights nor input activations")
    if algorithm is None and inputs is not None and inputs.scaling is not T.Scaling.DYNAMIC:
        raise ValueError("algorithm null leaves its static input scales (or NVFP4 input amax) uncalibrated "
                         "(ModelOpt would then take each batch's abs-max); use algorithm max")
    if _nvfp4_beside_fp8(weights, inputs):
        raise ValueError("ModelOpt exports NVFP4 weights beside per-tensor FP8 inputs as W4A8_NVFP4_FP8, "
                         "whose weights take a second scale of amax / 448, which is not modelled")
    if alpha is not None and not _smoothable(weights, inputs):
        raise ValueError("smoothquant with quantizers other than 8-bit INT weights and a static 8-bit INT "
                         "input scale per tensor is not modelled (ModelOpt skips smoothing such layers)")
    return T.Target(T.MODELOPT, name, T.MODELOPT_CHECKED, weights, inputs,
                    ModelOptCoverage(found, weights, inputs), smoothquant_alpha=alpha)
