"""A ModelOpt ``quant_cfg``: which quantizers of a model it turns on, and with which attributes.

ModelOpt (``mtq.quantize``) gives every module class it knows a set of quantizers, named
``<module>.<quantizer>`` (a Linear: ``weight_quantizer`` and ``input_quantizer``, on by default at 8
bits per tensor, and ``output_quantizer``, off), then applies the ``quant_cfg`` entries in order. An entry
names quantizers by a glob (``quantizer_name``), optionally only those whose module is of a class
(``parent_class``); its ``cfg`` replaces every attribute of the quantizers it matches (what it leaves out
goes back to the default) and turns them on unless ``enable`` says otherwise; ``enable`` alone only turns
them on or off. The older form, a mapping of globs (``default`` for ``*``, ``nn.Class`` for one class
of module) to attributes, means the same entries.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WEIGHT = "weight_quantizer"
INPUT = "input_quantizer"
OUTPUT = "output_quantizer"
BMM = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "p_bmm_quantizer")

LINEAR_CLASSES = ("Linear", "Conv1D")
"""Classes ModelOpt gives a Linear's three quantizers (``nn.Linear``; transformers' ``Conv1D``)."""
QUANTIZERS: dict[str, dict[str, bool]] = {
    **{c: {WEIGHT: True, INPUT: True, OUTPUT: False} for c in LINEAR_CLASSES},
    "Embedding": {WEIGHT: True, INPUT: False, OUTPUT: False},
    "LayerNorm": {INPUT: True, OUTPUT: False},
}
"""Module class -> its quantizers and whether each is on before any entry (ModelOpt 0.47.0)."""


@dataclass(frozen=True)
class Entry:
    """One ``quant_cfg`` entry: a quantizer glob, the class its module must be (None: any), the
    attributes it sets (None: it sets none) and whether it leaves the quantizers on."""

    pattern: str
    parent_class: str | None
    cfg: Mapping[str, Any] | list | None  # a list: ModelOpt's sequential quantizers, one after another
    enable: bool

    def matches(self, quantizer: str, classes: tuple[str, ...]) -> bool:
        """True for the quantizer named ``quantizer`` of a module whose class and bases are ``classes``."""
        if self.parent_class is not None and self.parent_class.rsplit(".", 1)[-1] not in classes:
            return False
        return fnmatch.fnmatchcase(quantizer, self.pattern)

    def reaches(self, role: str) -> bool:
        """Whether the glob can match some module's quantizer named ``role`` (``weight_quantizer``...)."""
        tail = self.pattern
        if "*" in self.pattern:
            tail = self.pattern.rsplit("*", 1)[1]  # what a name must end with, after the last star
            if fnmatch.fnmatchcase("." + role, "*" + tail):
                return True
        elif "." not in tail:
            return fnmatch.fnmatchcase(role, tail)
        return "." in tail and fnmatch.fnmatchcase(role, tail.rsplit(".", 1)[1])


def _entry(fields: Mapping[str, Any], parent_class: Any = None) -> Entry:
    """An entry from its list form ``{quantizer_name, parent_class?, cfg?, enable?}``."""
    unknown = sorted(set(fields) - {"quantizer_name", "parent_class", "cfg", "enable"})
    if unknown:
        raise ValueError(f"quant_cfg entry for {fields.get('quantizer_name')!r}: unknown key {unknown[0]!r}")
    pattern, cfg, enable = fields.get("quantizer_name"), fields.get("cfg"), fields.get("enable")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"quant_cfg entry {dict(fields)!r} has no quantizer_name")
    if cfg is None and enable is None:
        raise ValueError(f"quant_cfg entry for {pattern!r} gives neither cfg nor enable")
    if cfg is not None and not isinstance(cfg, (Mapping, list)):
        raise ValueError(f"quant_cfg entry for {pattern!r}: cfg must be a mapping of attributes (or a list "
                         "of them)")
    if enable is not None and not isinstance(enable, bool):
        raise ValueError(f"quant_cfg entry for {pattern!r}: enable must be true or false")
    parent = fields.get("parent_class", parent_class)
    return Entry(pattern, None if parent is None else str(parent), cfg, True if enable is None else enable)


def _legacy(key: Any, value: Any) -> list[Entry]:
    """The entries of one pair of the older mapping form."""
    key = "*" if key == "default" else str(key)
    if key.startswith("nn."):
        if not isinstance(value, Mapping):
            raise ValueError(f"quant_cfg: {key} must map quantizer globs to attributes")
        return [e for name, sub in value.items() for e in _legacy_pair(str(name), sub, key)]
    return _legacy_pair(key, value, None)


def _legacy_pair(pattern: str, value: Any, parent_class: str | None) -> list[Entry]:
    if not isinstance(value, Mapping):
        return [_entry({"quantizer_name": pattern, "cfg": value}, parent_class)]
    cfg = {k: v for k, v in value.items() if k != "enable"} or None
    fields = {"quantizer_name": pattern, "cfg": cfg, "enable": value.get("enable")}
    return [_entry(fields, parent_class)]


def entries(quant_cfg: Any) -> tuple[Entry, ...]:
    """The entries of a ``quant_cfg`` in either form, in the order ModelOpt applies them."""
    if isinstance(quant_cfg, Mapping):
        quant_cfg = [{k: v} for k, v in quant_cfg.items()]
    if not isinstance(quant_cfg, list):
        raise ValueError("quant_cfg must be a list of entries or a mapping of quantizer globs")
    found: list[Entry] = []
    for raw in quant_cfg:
        if not isinstance(raw, Mapping):
            raise ValueError(f"quant_cfg entry {str(raw)[:60]!r} is not a mapping")
        if "quantizer_name" in raw:
            found.append(_entry(raw))
        else:
            found += [e for key, value in raw.items() for e in _legacy(key, value)]
    return tuple(found)


def state(found: tuple[Entry, ...], quantizer: str, classes: tuple[str, ...], on: bool
          ) -> tuple[bool, Mapping[str, Any] | list | None]:
    """``(on, attributes)`` of the quantizer named ``quantizer`` (``<module>.<role>``) after every
    entry, starting ``on`` or off with the default attributes (None)."""
    cfg: Mapping[str, Any] | list | None = None
    for entry in found:
        if entry.matches(quantizer, classes):
            on = entry.enable
            if entry.cfg is not None:
                cfg = entry.cfg
    return on, cfg


def module_quantizers(classes: tuple[str, ...]) -> dict[str, bool]:
    """The quantizers ModelOpt gives a module of these classes, each with whether it starts on."""
    for name in classes:
        if name in QUANTIZERS:
            return QUANTIZERS[name]
    return {}


DEFAULT_EXCLUDED = (*(f"*{p}*" for p in ("block_sparse_moe.gate", "linear_attn.conv1d",
                                          "self_attention.conv1d", "linear_attn.in_proj_a",
                                          "linear_attn.in_proj_b", "lm_head", "mixer.conv1d", "mlp.gate.",
                                          "mlp.shared_expert_gate.", "output_layer", "proj_out.", "router")),
                    "mtp.*", "output.*",
                    *(f"*{p}*" for p in ("embed_vision", "vision_tower", "visual", "vision_model",
                                         "multi_modal_projector")))
DEFAULT_EXCLUDED_CLASSES = ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d", "nn.LeakyReLU",
                            "nn.Embedding")
"""ModelOpt's default exclusions (``_default_disabled_quantizer_cfg``, the tail of every model preset):
quantizer name patterns, then module classes whose every quantizer is off."""


def exclusions() -> list[dict[str, Any]]:
    """ModelOpt's default exclusions as ``quant_cfg`` entries, in its order."""
    return [*({"quantizer_name": p, "enable": False} for p in DEFAULT_EXCLUDED),
            *({"quantizer_name": "*", "parent_class": c, "enable": False} for c in DEFAULT_EXCLUDED_CLASSES)]


@dataclass(frozen=True)
class Reach:
    """The modules whose quantizers the entries leave on (a module ModelOpt gives no quantizer: none)."""

    entries: tuple[Entry, ...]

    def covers(self, name: str, classes: tuple[str, ...]) -> bool:
        return any(self.final(name, classes).values())

    def final(self, name: str, classes: tuple[str, ...]) -> dict[str, bool]:
        """Each quantizer of the module ``name`` (of these classes), on or off after every entry."""
        return {role: state(self.entries, f"{name}.{role}", classes, on)[0]
                for role, on in module_quantizers(classes).items()}

    def describe(self) -> str:
        return f"its quant_cfg of {len(self.entries)} entries"


def shipped(weights: bool, inputs: bool) -> Reach:
    """What a ModelOpt model preset turns on as it ships: every quantizer off, then every weight and
    every input quantizer (as the preset says), then the default exclusions."""
    roles = [role for role, wanted in ((WEIGHT, weights), (INPUT, inputs)) if wanted]
    on = [Entry(f"*{role}", None, None, True) for role in roles]
    return Reach((Entry("*", None, None, False), *on, *entries(exclusions())))
