"""A profile counts every format of the registry exactly: against the inputs each Linear really
received, quantized by the format's own fake quantization, sequence by sequence."""

from __future__ import annotations

import polars as pl
import pytest
import torch

import kernelscope as ks
from kernelscope.quant import formats as F
from tests.conftest import tiny_model

FORMATS = [name for name, entry in F.FORMATS.items() if not entry.takes_alpha]
"""Every format of the registry (CrossQuant, with its α, has tests of its own in test_stats)."""


def captured_inputs(model, windows, layers):
    """Every selected Linear's input, one (B, T, I) tensor per forward pass, captured independently."""
    seen: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = [
        layer.module.register_forward_pre_hook(
            lambda _m, args, name=layer.name: seen[name].append(args[0].detach().clone())
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            for first in range(0, len(windows), 2):
                model(windows.tokens[first : first + 2])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def run(tokenizer):
    from tests.conftest import pydoc_text

    model = tiny_model("llama", seed=3)
    with torch.no_grad():  # a few large channels, as real activations have
        model.model.layers[0].mlp.down_proj.weight[:, :3] *= 30.0
    windows = ks.make_windows(ks.tokenize(tokenizer, pydoc_text()[:40_000]), 48, 4)
    configs = ks.expand_configs(FORMATS, [8, 4], [], group_size=16)
    result = ks.profile(model, windows, configs, batch_size=2)
    return model, windows, configs, result


def test_every_format_counts_what_its_fake_quantization_zeroes(run):
    model, windows, configs, result = run
    layers = ks.select_linear_layers(model)
    inputs = captured_inputs(model, windows, layers)
    for layer in layers:
        rows = {
            r["config"]: r for r in result.layers.filter(pl.col("layer") == layer.name).iter_rows(named=True)
        }
        for cfg in configs:
            fmt = cfg.format
            kernel = subnormal = blocks = whole = 0
            bound = 0.0
            for x in inputs[layer.name]:  # (B, T, I)
                for seq in x:  # one sequence at a time: no statistic may mix them
                    q, _s = F.quantize(seq, fmt)
                    kernel += int((F.fake_quantize(seq, fmt) == 0).sum())
                    subnormal += int(fmt.grid.subnormal(q).sum())
                    bound += float(F.zero_bound(seq, fmt).double().expand(seq.shape).sum())
                    if fmt.is_block:
                        mask = F.block_kernel_mask(seq, fmt)
                        blocks, whole = blocks + mask.numel(), whole + int(mask.sum())
            row = rows[cfg.label]
            assert row["kernel_elements"] == kernel, (layer.name, cfg.label)
            elements = row["elements"]
            assert row["bound_mean"] == pytest.approx(bound / elements, rel=1e-12)
            if fmt.grid.is_int:
                assert row["subnormal_fraction"] is None
            else:
                assert row["subnormal_elements"] == subnormal
            if fmt.is_block:
                assert (row["blocks"], row["kernel_blocks"]) == (blocks, whole)
            else:
                assert row["block_kernel_fraction"] is None


def test_format_columns_and_model_level(run):
    _, _, configs, result = run
    assert result.layers["config"].unique(maintain_order=True).to_list() == [c.label for c in configs]
    level = {r["config"]: r for r in result.model_level.iter_rows(named=True)}
    assert (
        level["mxfp4"]["format"] == "e2m1"
        and level["mxfp4"]["block_size"] == 32
        and level["mxfp4"]["bits"] == 4
    )
    assert level["nvfp4"]["block_size"] == 16 and level["fp8_per_token"]["format"] == "e4m3"
    assert level["per_group g16 int4"]["block_size"] == 16 and level["per_group g16 int4"]["format"] == "int4"
    assert level["per_token int8"]["subnormal_fraction"] is None
    # FLOOR's scale is at most RCEIL's, so RCEIL's kernel can only be larger (DESIGN.md §1b)
    assert level["mxfp4_rceil"]["kernel_elements"] >= level["mxfp4"]["kernel_elements"]
    assert level["fp8_per_token"]["kernel_fraction"] < level["per_token int8"]["kernel_fraction"]


def test_a_resumed_profile_with_formats_is_the_uninterrupted_one(tmp_path, run):
    model, windows, configs, result = run
    checkpoint = tmp_path / ".run.checkpoint"

    def stop_after_one(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ks.profile(model, windows, configs, batch_size=2, checkpoint=checkpoint, progress=stop_after_one)
    resumed = ks.profile(model, windows, configs, batch_size=2, checkpoint=checkpoint, resume=True)
    assert resumed.summary["resumed_from_window"] == 2
    assert resumed.layers.equals(result.layers)


@pytest.mark.parametrize("native", ["1", "0"])
def test_nonfinite_inputs_are_left_out_of_format_counts(monkeypatch, native):
    from kernelscope.stats.measure import measure

    monkeypatch.setenv("KERNELSCOPE_NATIVE", native)
    x = torch.randn(2, 5, 40)
    x[0, 1, 3], x[1, 2, 7], x[1, 4, 0] = float("nan"), float("inf"), float("-inf")
    cfgs = [
        ks.QuantizerConfig(name, 4 if name in ("mxfp4", "nvfp4") else 8)
        for name in ("mxfp4", "nvfp4", "fp8_per_tensor")
    ]
    counted = measure(x, cfgs).counted
    clean = torch.where(torch.isfinite(x), x, 0.0)
    for i, cfg in enumerate(cfgs):
        expected = (F.fake_quantize(clean, cfg.format) == 0) & torch.isfinite(x)
        assert int(counted.counts[i, 0]) == int(expected.sum())
    assert int(counted.nonfinite) == 3
    assert torch.isfinite(counted.bounds).all() and counted.bounds.shape == (2, 2 + 2)  # two block formats


def test_formats_alone_give_the_same_rows(run):
    model, windows, _, result = run
    alone = ks.profile(model, windows, [ks.QuantizerConfig("mxfp4", 4), ks.QuantizerConfig("nvfp4", 4)],
                       batch_size=2)
    assert alone.layers["config"].unique(maintain_order=True).to_list() == ["mxfp4", "nvfp4"]
    both = result.layers.filter(pl.col("config").is_in(["mxfp4", "nvfp4"]))
    assert alone.layers.equals(both)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_kernels_against_the_weights_themselves(family):
    from kernelscope.runs.weights import weight_kernels
    from tests import reference as ref

    model = tiny_model(family, seed=1)
    configs = [ks.QuantizerConfig("per_token", 4), ks.QuantizerConfig("per_group", 4, block_size=16),
               ks.QuantizerConfig("nvfp4", 4), ks.QuantizerConfig("fp8_per_token", 8)]
    table = weight_kernels(model, configs)
    for layer in ks.select_linear_layers(model):
        w = layer.module.weight.detach()
        w = w.t() if family == "gpt2" else w  # GPT-2's Conv1D keeps (I, O)
        expected = {
            # per row
            "per_token int4": int((ref.int_fake_quantize(w, ref.int_weight_step(w, 4), 4) == 0).sum()),
            "per_group g16 int4": int((ref.int_fake_quantize(w, ref.int_weight_step(w, 4, 16), 4)
                                       == 0).sum()),
            "nvfp4": int((F.fake_quantize(w, configs[2].format) == 0).sum()),
            "fp8_per_token": int((F.fake_quantize(w, configs[3].format) == 0).sum()),
        }
        rows = table.filter(pl.col("layer") == layer.name)
        assert dict(zip(rows["config"], rows["kernel_elements"], strict=True)) == expected
        assert set(rows["out_features"]) == {w.shape[0]} and set(rows["elements"]) == {w.numel()}


def test_profile_writes_weights_parquet(tmp_path, run):
    model, windows, _, _ = run
    result = ks.profile(model, windows, [ks.QuantizerConfig("mxfp4", 4)],
                        weight_formats=[ks.QuantizerConfig("nvfp4", 4)])
    result.save(tmp_path / "run")
    weights = pl.read_parquet(tmp_path / "run" / "weights.parquet")
    assert weights.height == 14 and set(weights["config"]) == {"nvfp4"}
    assert result.summary["weights_model_level"][0]["config"] == "nvfp4"
    assert ks.profile(model, windows, [ks.QuantizerConfig("mxfp4", 4)], weight_formats=()).weights is None
