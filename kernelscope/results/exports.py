"""What a plan becomes for the tools that deploy it, and how those files are read back.

Beside its ``summary.json`` (kind ``advise``) an advice folder holds:

- ``recipe.yaml``: an llm-compressor recipe, one ``QuantizationModifier`` with ``targets: [Linear]``,
  the scheme as llm-compressor's preset name where one quantizes exactly what the scheme quantizes,
  else explicit ``config_groups`` (compressed-tensors ``QuantizationArgs`` fields), and ``ignore:``
  listing every Linear the plan leaves in full precision (``lm_head``, the kept layers, and any Linear
  the measurement did not cover);
- ``modelopt_quant_cfg.json``: ModelOpt ``quant_cfg`` entries that disable the input and weight
  quantizers of those layers by name pattern (``"*model.layers.3.mlp.down_proj*": {"enable": false}``),
  to merge after the entries of the ModelOpt config that deploys the scheme;
- ``modules.txt``: the kept layers' module names, one a line.

Which arguments a scheme means is derived from the formats registry: a format's scale unit and form
say the compressed-tensors strategy (:data:`STRATEGIES`), its element grid the type and bits. The
presets are data (:data:`LLMCOMPRESSOR_PRESETS`, :data:`MODELOPT_CONFIGS`), matched on those
arguments, never on names. Pure text and dict building; the run folder writes the files.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernelscope.errors import KernelscopeError
from kernelscope.quant.formats import FORMATS, Form, Unit
from kernelscope.results.paths import EXPORT_NAMES, SUMMARY, summary_of

if TYPE_CHECKING:  # the scheme is read through its fields only
    from kernelscope.quant import QuantizerConfig

RECIPE, MODELOPT, MODULES = EXPORT_NAMES

WEIGHTS, ACTIVATIONS = "weights", "input_activations"


@dataclass(frozen=True)
class QuantArgs:
    """The compressed-tensors ``QuantizationArgs`` fields a kernelscope quantizer fixes."""

    num_bits: int
    type: str  # int | float
    strategy: str  # token | channel | tensor | group | tensor_group
    group_size: int | None
    symmetric: bool
    dynamic: bool | str  # True: scales from each tensor as it comes; "local": block scales only

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["group_size"] is None:
            del d["group_size"]
        return d


STRATEGIES: dict[tuple[Unit, Form, str], str] = {
    (Unit.TOKEN, Form.ABSMAX, ACTIVATIONS): "token",
    (Unit.TOKEN, Form.ABSMAX, WEIGHTS): "channel",  # a weight's "token" is its output channel
    (Unit.TENSOR, Form.ABSMAX, ACTIVATIONS): "tensor",
    (Unit.TENSOR, Form.ABSMAX, WEIGHTS): "tensor",
    (Unit.BLOCK, Form.ABSMAX, ACTIVATIONS): "group",
    (Unit.BLOCK, Form.ABSMAX, WEIGHTS): "group",
    (Unit.BLOCK, Form.E8M0_FLOOR, ACTIVATIONS): "group",
    (Unit.BLOCK, Form.E8M0_FLOOR, WEIGHTS): "group",
    (Unit.BLOCK, Form.E8M0_RCEIL, ACTIVATIONS): "group",
    (Unit.BLOCK, Form.E8M0_RCEIL, WEIGHTS): "group",
    (Unit.BLOCK, Form.NVFP4, ACTIVATIONS): "tensor_group",
    (Unit.BLOCK, Form.NVFP4, WEIGHTS): "tensor_group",
}
"""(scale unit, scale form, role) -> strategy. Absent: no deployed equivalent (CrossQuant's
t^α·c^(1-α) step, an activation step per input channel over the tokens)."""

DYNAMIC_ACTIVATIONS: dict[str, bool | str] = {"nvfp4": "local"}
"""Scale form -> ``dynamic`` of the activations where it is not True: NVFP4's block scales are
dynamic, its tensor scale calibrated."""

FORM_NOTES: dict[str, str] = {
    "e8m0_rceil": "the MX scale's rounding (RCEIL here, FLOOR in OCP MX) is the deploying kernel's, not the "
                  "recipe's",
    "nvfp4": "the activations' tensor scale is calibrated in the preset; kernelscope measured it per "
             "sequence",
}


@dataclass(frozen=True)
class Preset:
    name: str
    weights: QuantArgs
    input_activations: QuantArgs | None


def _int(bits: int, strategy: str, group: int | None = None, dynamic: bool = False) -> QuantArgs:
    return QuantArgs(bits, "int", strategy, group, True, dynamic)


def _float(bits: int, strategy: str, group: int | None = None, dynamic: bool | str = False) -> QuantArgs:
    return QuantArgs(bits, "float", strategy, group, True, dynamic)


LLMCOMPRESSOR_PRESETS: tuple[Preset, ...] = (
    Preset("W8A8", _int(8, "channel"), _int(8, "token", dynamic=True)),
    *(Preset(f"W{w}A{a}", _int(w, "group", 128), _int(a, "token", dynamic=True))
      for w, a in ((2, 4), (2, 8), (3, 4), (3, 8), (4, 4), (4, 8), (5, 8), (6, 8), (7, 8))),
    Preset("FP8_DYNAMIC", _float(8, "channel"), _float(8, "token", dynamic=True)),
    Preset("MXFP8", _float(8, "group", 32), _float(8, "group", 32, dynamic=True)),
    Preset("MXFP4", _float(4, "group", 32), _float(4, "group", 32, dynamic=True)),
    Preset("NVFP4", _float(4, "tensor_group", 16), _float(4, "tensor_group", 16, dynamic="local")),
)
"""llm-compressor (compressed-tensors) preset schemes, by the arguments they set."""

MODELOPT_CONFIGS: tuple[Preset, ...] = (
    Preset("FP8_PER_CHANNEL_PER_TOKEN_CFG", _float(8, "channel"), _float(8, "token", dynamic=True)),
    Preset("MXFP8_DEFAULT_CFG", _float(8, "group", 32), _float(8, "group", 32, dynamic=True)),
    Preset("MXFP4_DEFAULT_CFG", _float(4, "group", 32), _float(4, "group", 32, dynamic=True)),
    Preset("NVFP4_DEFAULT_CFG", _float(4, "tensor_group", 16),
           _float(4, "tensor_group", 16, dynamic="local")),
)
"""ModelOpt's ``mtq`` configs that quantize as a kernelscope scheme does (its INT8 configs calibrate a
static per-tensor activation scale, so a dynamic per-token scheme has none)."""


def quant_args(config: QuantizerConfig, role: str) -> QuantArgs | None:
    """The arguments of ``config`` used on weights or input activations; None without a deployed
    equivalent."""
    entry = FORMATS[config.quantizer]
    strategy = STRATEGIES.get((entry.rule.unit, entry.rule.form, role))
    if strategy is None:
        return None
    grid = entry.grid
    dynamic = DYNAMIC_ACTIVATIONS.get(entry.rule.form, True) if role == ACTIVATIONS else False
    group = config.block_size if entry.rule.unit is Unit.BLOCK else None
    return QuantArgs(config.bits, "int" if grid is None or grid.is_int else "float", strategy, group, True,
                     dynamic)


@dataclass(frozen=True)
class Deployment:
    """What a scheme quantizes, as compressed-tensors arguments, or why it cannot be written so."""

    weights: QuantArgs | None
    input_activations: QuantArgs | None
    reason: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def preset(self) -> str | None:
        return _match(LLMCOMPRESSOR_PRESETS, self)

    @property
    def modelopt(self) -> str | None:
        return _match(MODELOPT_CONFIGS, self)


def _match(presets: Iterable[Preset], d: Deployment) -> str | None:
    if d.reason is not None:
        return None
    return next((p.name for p in presets
                 if (p.weights, p.input_activations) == (d.weights, d.input_activations)), None)


def deployment(scheme, transform=None) -> Deployment:
    """The weight and activation arguments of ``scheme`` (a :class:`~kernelscope.runs.schemes.Scheme`)
    quantizing in the basis of ``transform`` (a :class:`~kernelscope.quant.transforms.TransformSpec`,
    its own transform included; None: the scheme's own alone)."""
    if not scheme.mode.deployable:
        return Deployment(None, None, f"{scheme.name} is a measurement, not a quantizer a tool deploys")
    basis = scheme.transform if transform is None else transform
    if not basis.is_identity:
        return Deployment(None, None, f"{scheme.name} quantizes in the {basis.label} basis, which "
                                      "kernelscope fits to every Linear on its own; llm-compressor's "
                                      "SmoothQuant and rotation modifiers transform norm-Linear pairs, a "
                                      "different scheme, so no recipe is written")
    act = quant_args(scheme.activation, ACTIVATIONS)
    if act is None:
        return Deployment(None, None, f"llm-compressor has no {scheme.activation.label} activation quantizer")
    if scheme.weight_format is not None:
        weights = quant_args(scheme.weight_format, WEIGHTS)
    elif scheme.weight_bits is not None:
        strategy = "group" if scheme.group_size else "channel"
        weights = QuantArgs(scheme.weight_bits, "int", strategy, scheme.group_size, True, False)
    else:
        weights = None
    if weights is None:
        return Deployment(None, None, f"{scheme.name} leaves the weights in full precision, which no "
                                      "activation-only llm-compressor scheme mirrors")
    forms = {FORMATS[c.quantizer].rule.form
             for c in (scheme.activation, scheme.weight_format) if c is not None}
    return Deployment(weights, act, notes=tuple(FORM_NOTES[f] for f in sorted(forms) if f in FORM_NOTES))


# -- writing --------------------------------------------------------------------------------------

def recipe(d: Deployment, ignore: list[str]) -> dict[str, Any]:
    """The llm-compressor recipe as a dict (None-free, ready for YAML)."""
    modifier: dict[str, Any] = {"targets": ["Linear"]}
    if d.preset is not None:
        modifier["scheme"] = d.preset
    else:
        group = {"targets": ["Linear"], WEIGHTS: d.weights.as_dict(),
                 ACTIVATIONS: d.input_activations.as_dict()}
        modifier["config_groups"] = {"group_0": group}
    modifier["ignore"] = list(ignore)
    return {"quant_stage": {"quant_modifiers": {"QuantizationModifier": modifier}}}


def recipe_yaml(d: Deployment, ignore: list[str], header: list[str]) -> str:
    """``recipe.yaml``: comment lines ``header``, then the recipe."""
    import yaml

    body = yaml.safe_dump(recipe(d, ignore), sort_keys=False, default_flow_style=False, width=1000)
    return "".join(f"# {line}\n" for line in header) + body


def modelopt_patterns(names: Iterable[str]) -> dict[str, dict[str, bool]]:
    """One disabling entry per module: every quantizer under it (input, weight, output)."""
    return {f"*{name}*": {"enable": False} for name in names}


def modelopt_config(d: Deployment, names: list[str], scheme_name: str) -> dict[str, Any]:
    """``modelopt_quant_cfg.json``: the disabling entries and the ModelOpt config they go with."""
    base = d.modelopt
    how = (f"merge quant_cfg after the entries of mtq.{base}" if base else
           f"merge quant_cfg after the entries of the ModelOpt config that deploys {scheme_name} "
           "(ModelOpt has none that quantizes exactly as it does)")
    return {"base_config": base, "note": how + "; later entries override earlier ones, so these disable "
                                               "the listed layers' quantizers",
            "quant_cfg": modelopt_patterns(names)}


def json_text(body: Any) -> str:
    from kernelscope.results.run_dir import to_json

    return to_json(body, indent=2) + "\n"


def modules_text(names: Iterable[str]) -> str:
    return "".join(f"{name}\n" for name in names)


# -- reading back: eval --ignore @FILE ---------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class IgnoreSpec:
    """Module names to leave in full precision, as a file gave them: exact names, ``re:`` regular
    expressions (llm-compressor's spelling, matched from the start of the name), shell patterns
    (ModelOpt's ``*...*``)."""

    source: str
    names: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

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
        for pattern in self.patterns:
            chosen |= {n for n in modules if fnmatch.fnmatchcase(n, pattern)}
        return sorted(chosen)


def read_ignore_file(path: str | Path, shown: str) -> IgnoreSpec:
    """The layers an advice file keeps in full precision: an advice folder or its ``summary.json``, an
    llm-compressor recipe, a ModelOpt ``quant_cfg`` JSON, or a list of module names one a line
    (``#`` starts a comment). ``shown`` is how the option names the file in errors."""
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
        return _from_recipe(text, shown)
    if file.suffix.lower() == ".json":
        return _from_json(text, shown)
    return _from_list(text, shown)


def _not_advice(shown: str, why: str) -> KernelscopeError:
    return KernelscopeError(f"{shown} is not an advice file: {why}")


def _from_recipe(text: str, shown: str) -> IgnoreSpec:
    import yaml

    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _not_advice(shown, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    found = _find_key(body, "QuantizationModifier")
    if not isinstance(found, dict) or not isinstance(found.get("ignore", []), list):
        raise _not_advice(shown, "no QuantizationModifier with an ignore list")
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
    cfg = body.get("quant_cfg") if isinstance(body, dict) else None
    if isinstance(cfg, dict):
        off = [k for k, v in cfg.items()
               if isinstance(v, dict) and v.get("enable") is False and k != "default"]
        return IgnoreSpec(shown, patterns=tuple(off))
    raise _not_advice(shown, "neither an advise summary (kind advise) nor a ModelOpt quant_cfg")


def _from_list(text: str, shown: str) -> IgnoreSpec:
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    bad = next((n for n in names if not _NAME.match(n)), None)
    if bad is not None:
        raise _not_advice(shown, f"{bad[:60]!r} is not a module name (one name a line)")
    return IgnoreSpec(shown, names=tuple(names))  # empty: a plan that keeps no layer
