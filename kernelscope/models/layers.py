"""Which Linear layers a run looks at, and what to call them (block index, module type)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kernelscope.capture import is_linear, linear_in_features
from kernelscope.errors import KernelscopeError


@dataclass(frozen=True)
class LinearLayer:
    """A selected Linear: its full module name, block index (None outside the blocks) and type."""

    name: str
    module: nn.Module
    block: int | None
    module_type: str
    in_features: int


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of repeated decoder blocks: the longest one whose blocks hold Linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def _module_types(relative_names: list[str]) -> dict[str, str]:
    """Shortest unambiguous suffix of each name inside a block: ``q_proj``, but ``attn.c_proj``."""
    out: dict[str, str] = {}
    for rel in relative_names:
        parts = rel.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            clashes = [r for r in relative_names if r != rel and (r == suffix or r.endswith("." + suffix))]
            if not clashes:
                out[rel] = suffix
                break
        else:
            out[rel] = rel
    return out


def select_linear_layers(
    model: nn.Module, pattern: str | None = None, *, include_lm_head: bool = False
) -> list[LinearLayer]:
    """The Linear layers to capture, in module order.

    Default: every Linear (``nn.Linear`` or ``Conv1D``) inside the decoder blocks. With ``pattern``,
    every Linear of the model whose name matches the regular expression (``re.search``). The output
    embedding (``lm_head``) is left out unless ``include_lm_head``.
    """
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise KernelscopeError(f"--layers {pattern!r} is not a valid regular expression: {exc}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    blocks = find_decoder_blocks(model)
    prefix = blocks[0] + "." if blocks else None

    chosen: list[tuple[str, nn.Module, int | None, str]] = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        is_head = head is not None and module is head
        block, rel = None, name
        if prefix and name.startswith(prefix):
            index, _, rel = name[len(prefix):].partition(".")
            block = int(index) if index.isdigit() else None
        if is_head:
            if include_lm_head:
                chosen.append((name, module, None, "lm_head"))
            continue
        if regex is not None:
            if not regex.search(name):
                continue
        elif block is None:
            continue
        chosen.append((name, module, block, rel))

    if not chosen:
        what = f"match --layers {pattern!r}" if pattern is not None else "were found in decoder blocks"
        hint = (" (the output projection is measured only with --include-lm-head)"
                if head is not None and regex is not None and not include_lm_head
                and any(regex.search(n) for n, m in model.named_modules() if m is head) else "")
        raise KernelscopeError(f"no Linear layers {what}{hint}; list them with `kernelscope layers MODEL`")
    types = _module_types(sorted({rel for _, _, b, rel in chosen if b is not None}))
    return [
        LinearLayer(name, module, block, types.get(rel, rel) if block is not None else rel,
                    linear_in_features(module))
        for name, module, block, rel in chosen
    ]
