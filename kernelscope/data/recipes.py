"""A user's own llm-compressor recipe or ModelOpt config, read as the deployment target it describes.

``--scheme llm-compressor:@recipe.yaml`` evaluates exactly what that file would deploy: its
``QuantizationModifier``'s preset ``scheme`` or its one ``config_groups`` entry, its ``targets`` and its
``ignore``. Anything that is not round-to-nearest quantization with min-max scales (GPTQ, AWQ,
SmoothQuant and other modifiers, activation ordering, an MSE observer, a KV-cache scheme) is refused
with the reason, never approximated.

``--scheme modelopt:@quant_cfg.yaml`` does the same for a ModelOpt ``QuantizeConfig`` (YAML or JSON, as
``mtq.quantize`` takes it): its ``quant_cfg`` entries applied in order to each Linear's weight and input
quantizers (:mod:`kernelscope.quant.modelopt_config`), and max calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kernelscope.quant import modelopt_config
from kernelscope.quant import targets as T

QUANTIZATION_MODIFIER = "QuantizationModifier"
_MODIFIER_KEYS = {"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme", "index", "group",
                  "start", "end", "update", "frequency"}
_GROUP_KEYS = {"targets", "weights", "input_activations", "output_activations", "format"}


def _modifiers(node: Any) -> list[tuple[str, Any]]:
    """Every ``...Modifier: {args}`` entry anywhere in the recipe's stages, in file order."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.endswith("Modifier"):
                found.append((key, value))
            else:
                found += _modifiers(value)
    elif isinstance(node, list):
        for item in node:
            found += _modifiers(item)
    return found


def _names(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{what} must be a module name, a class name or re:PATTERN, or a list of them")
    return tuple(values)


def _preset(scheme: Any, targets: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """A preset ``scheme``: its name and targets (``W8A8``, or ``{W8A8: [Linear]}``)."""
    if isinstance(scheme, str):
        return scheme, targets
    if isinstance(scheme, dict) and len(scheme) == 1:
        name, own = next(iter(scheme.items()))
        return str(name), _names(own, f"the targets of scheme {name}")
    raise ValueError("scheme must name one preset (W8A8, FP8_DYNAMIC, ...) or map one preset to its targets")


def _group(groups: Any) -> tuple[T.Args | None, T.Args | None, tuple[str, ...]]:
    """The one ``config_groups`` entry: its weight and activation arguments and its targets."""
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("config_groups must hold exactly one group (several groups with different "
                         "arguments are not supported: give one recipe per group)")
    name, group = next(iter(groups.items()))
    if not isinstance(group, dict):
        raise ValueError(f"config group {name} must be a mapping")
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"config group {name}: unknown key {unknown[0]!r}")
    if group.get("output_activations"):
        raise ValueError(f"config group {name} quantizes output activations, which is not modelled")
    args = [T.args_from_dict(group[role], role) if group.get(role) else None
            for role in ("weights", "input_activations")]
    return args[0], args[1], _names(group.get("targets"), f"the targets of config group {name}")


def target_from_recipe(recipe: Any, name: str) -> T.Target:
    """The target a parsed recipe deploys (``name``: how the user gave it)."""
    modifiers = _modifiers(recipe)
    others = [key for key, _ in modifiers if key != QUANTIZATION_MODIFIER]
    if others:
        raise ValueError(f"it uses {others[0]}; kernelscope evaluates round-to-nearest quantization only "
                         f"({QUANTIZATION_MODIFIER}), not the algorithms of other modifiers")
    if len(modifiers) != 1 or not isinstance(modifiers[0][1], dict):
        raise ValueError(f"it must hold exactly one {QUANTIZATION_MODIFIER} with its arguments, found "
                         f"{len(modifiers)}")
    args = modifiers[0][1]
    unknown = sorted(set(args) - _MODIFIER_KEYS)
    if unknown:
        raise ValueError(f"{QUANTIZATION_MODIFIER}: unknown argument {unknown[0]!r}")
    if args.get("kv_cache_scheme"):
        raise ValueError("its kv_cache_scheme quantizes the KV cache, which is not modelled")
    if ("scheme" in args) == ("config_groups" in args):
        raise ValueError(f"{QUANTIZATION_MODIFIER} needs either scheme or config_groups")
    targets = _names(args.get("targets", ["Linear"]), "targets")
    if "scheme" in args:
        preset, targets = _preset(args["scheme"], targets)
        known = T.get_target(f"{T.LLM_COMPRESSOR}:{preset}")
        weights, acts = known.weights, known.input_activations
    else:
        weights, acts, own = _group(args["config_groups"])
        targets = own or targets
    if weights is None and acts is None:
        raise ValueError("it quantizes neither weights nor input activations")
    coverage = T.Coverage(targets, _names(args.get("ignore"), "ignore"))
    return T.Target(T.LLM_COMPRESSOR, name, T.CHECKED, weights, acts, coverage)


def _read_yaml(path: str, what: str) -> Any:
    """The parsed YAML (or JSON) file at ``path``; ValueError naming it as ``what`` when it is missing
    or does not parse."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"no {what} file {path!r}")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} is not a readable YAML {what} ({exc.__class__.__name__})") from None


def read_recipe(path: str) -> T.Target:
    """The target of the recipe at ``path``; ValueError with the reason when it cannot be evaluated."""
    return target_from_recipe(_read_yaml(path, "recipe"), f"@{path}")


def read_modelopt_config(path: str) -> T.Target:
    """The target of the ModelOpt config at ``path``; ValueError with the reason when it cannot be
    evaluated exactly."""
    return modelopt_config.target_of(_read_yaml(path, "ModelOpt config"), f"@{path}")
