"""Weight kernels: the weights each Linear's weight quantizer rounds to zero, read from the weights
alone (no forward pass). A weight ``W (O, I)`` is quantized as one "sequence" whose rows are the
output channels: ``per_token`` is per output channel, a block format takes blocks along the input
axis, ``nvfp4``'s tensor scale is the whole weight's (DESIGN.md §1b, "Weights")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl
import torch
from torch import nn

from kernelscope.models import LinearLayer
from kernelscope.quant import QuantizerConfig
from kernelscope.quant.transforms import NONE
from kernelscope.results.schema import COLUMNS
from kernelscope.runs.common import resolve_layers
from kernelscope.runs.fakequant import weight_out_in
from kernelscope.stats.measure import measure
from kernelscope.stats.table import measured_rows

if TYPE_CHECKING:
    from kernelscope.runs.transforming import ModelTransform

DEFAULT_WEIGHT_FORMAT = QuantizerConfig("per_token", 8)
"""INT8, one step per output channel: what W8A8 deployments use."""


def _onloaded(module: nn.Module):
    """The module's weights on a real device for the length of a ``with`` (offloaded ones come in)."""
    from accelerate.utils import align_module_device

    return align_module_device(module)


def weight_kernels(model: nn.Module, configs: Sequence[QuantizerConfig],
                   layers: str | Sequence[LinearLayer] | None = None,
                   include_lm_head: bool = False, *,
                   transforms: Sequence[ModelTransform] = ()) -> pl.DataFrame:
    """One row per transform × layer × weight quantizer: the kernel of the weight, its subnormal and
    whole-block shares, and its zero bound, with the same columns as a profile's rows where they apply.
    Each weight is counted as a profile counts an input, and the weights of one shape summarised together.

    Under a transform ``T`` the weight counted is the one deployed with it, ``W·T⁻ᵀ`` (so that
    ``T(x)·(W·T⁻ᵀ)ᵀ = x·Wᵀ``); with no ``transforms`` only the weight as it is (``none``)."""
    configs = list(configs)
    selected = resolve_layers(model, layers, include_lm_head)
    bases, measured = [], []
    for label, bound in _bases(transforms):
        for layer in selected:
            with torch.no_grad(), _onloaded(layer.module):
                w = weight_out_in(layer.module).detach()  # (O, I)
                w = w if bound is None else bound[layer.name].weight(w)
                m = measure(w.unsqueeze(0), configs)  # (1, O, I): one sequence whose rows are the outputs
                nonfinite = int(m.counted.nonfinite)
                bases.append({"layer": layer.name, "block": layer.block, "module_type": layer.module_type,
                              "transform": label, "out_features": w.shape[0], "in_features": w.shape[1],
                              "zero_weights": w.numel() - int(torch.count_nonzero(w)),
                              # the largest finite |w|, as a profile's abs_max
                              "abs_max": float(m.token.max()),
                              "elements": w.numel() - nonfinite})
                measured.append(m)
    rows = [{**base, "config": cfg.label, **row}
            for base, per_config in zip(bases, measured_rows(measured, configs), strict=True)
            for cfg, row in zip(configs, per_config, strict=True)]
    frame = pl.DataFrame(rows,
                         schema_overrides={name: COLUMNS[name].dtype for name in rows[0] if name in COLUMNS},
                         infer_schema_length=None)
    lead = ["layer", "block", "module_type", "transform", "quantizer", "bits", "alpha", "config", "elements",
            "kernel_elements", "kernel_fraction"]
    return frame.select(lead + [c for c in frame.columns if c not in lead])


def _bases(transforms: Sequence[ModelTransform]):
    """(label, the layers' bound transforms or None for the identity) of each basis to count in."""
    if not transforms:
        return [(NONE, None)]
    return [(t.label, None if t.is_identity else t.layers) for t in transforms]


def weight_rollup(frame: pl.DataFrame) -> pl.DataFrame:
    """Parameter-weighted kernel of each weight quantizer over all layers of ``frame``."""
    return (frame.group_by("transform", "config", maintain_order=True)
            .agg(pl.col("elements").sum(), pl.col("kernel_elements").sum(), pl.len().alias("layers"))
            .with_columns((pl.col("kernel_elements") / pl.col("elements")).alias("kernel_fraction")))
