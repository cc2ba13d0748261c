"""Capture and profile on tiny random models of six families, recounted by brute force."""

from __future__ import annotations

import pytest
import torch

from kernelscope.capture import LinearInputCapture, is_linear
from kernelscope.data import make_windows
from kernelscope.models import find_decoder_blocks, select_linear_layers
from kernelscope.quant import QuantizerConfig, default_configs
from kernelscope.runs import profile
from tests import reference as ref
from tests.conftest import FAMILIES, tiny_model

EXPECTED_TYPES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
}


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def windows_for(seed: int = 0, n: int = 3, seqlen: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (n * seqlen + 5,), generator=g)
    return make_windows(ids, seqlen, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_selection(family):
    model = tiny_model(family)
    layers = select_linear_layers(model)
    per_block = [layer.module_type for layer in layers if layer.block == 0]
    assert sorted(per_block) == sorted(EXPECTED_TYPES[family])
    assert len(layers) == 2 * len(EXPECTED_TYPES[family])
    assert all("lm_head" not in layer.name for layer in layers)
    head = select_linear_layers(model, include_lm_head=True)
    assert head[-1].module_type == "lm_head" and len(head) == len(layers) + 1
    only_first = select_linear_layers(model, r"\.0\.")
    assert {layer.block for layer in only_first} == {0}


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_counts_equal_brute_force_recount(family):
    model = tiny_model(family)
    configs = [*default_configs(), QuantizerConfig("crossquant", 8, 1.0), QuantizerConfig("per_tensor", 4)]
    windows = windows_for()
    names = {layer.name for layer in select_linear_layers(model)}

    # Independent capture: plain hooks that keep a copy of every input.
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(name, x):  # (B, T, I); OPT flattens its MLP input to (B*T, I): split it by window
        captured[name].append(x.detach().clone().reshape(-1, windows.seqlen, x.shape[-1]))

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(n, args[0]))
               for n, m in model.named_modules() if n in names]
    try:
        result = profile(model, windows, configs, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert no_hooks(model)

    layers = result.layers
    assert layers.height == len(names) * len(configs)
    for name, xs in captured.items():
        assert len(xs) == 2  # two batches: 2 windows then 1
        for cfg in configs:
            row = (layers.filter((layers["layer"] == name) & (layers["config"] == cfg.label))
                   .row(0, named=True))
            expect = sum(ref.kernel_count(x, cfg.quantizer, cfg.bits, cfg.alpha) for x in xs)
            assert row["kernel_elements"] == expect, (name, cfg.label)
            assert row["elements"] == sum(x.numel() for x in xs)
        assert row["c_ge_t_pairs"] == sum(ref.c_ge_t_pairs(x) for x in xs)
    # α = 1 reproduces per-token in every layer
    pt = layers.filter(layers["config"] == "per_token int8")["kernel_elements"].to_list()
    a1 = layers.filter(layers["config"] == "crossquant a=1 int8")["kernel_elements"].to_list()
    assert pt == a1
    # the model-level figure is elements-weighted
    ml = result.model_level.filter(result.model_level["config"] == "per_token int8").row(0, named=True)
    sub = layers.filter(layers["config"] == "per_token int8")
    assert ml["kernel_fraction"] == sub["kernel_elements"].sum() / sub["elements"].sum()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_outputs_bitwise_identical_and_state_restored_after_profile(family):
    model = tiny_model(family)
    model.train()  # a caller's model in training mode is handed back in training mode
    ids = windows_for(1).tokens
    with torch.no_grad():
        model.eval()
        before = model(input_ids=ids).logits.clone()
        model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, windows_for(2), default_configs())
    assert model.training
    assert no_hooks(model)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.eval()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_hooks_removed_when_the_observer_raises():
    model = tiny_model("llama")
    modules = {layer.name: layer.module for layer in select_linear_layers(model)}

    def boom(name, x):
        raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"), LinearInputCapture(modules, boom):
        model(input_ids=windows_for().tokens[:1])
    assert no_hooks(model)


def test_hooks_removed_when_the_forward_pass_raises():
    model = tiny_model("opt")
    was_training = model.training
    bad = windows_for().tokens.clone()
    bad[0, 0] = 10_000  # beyond the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        profile(model, make_windows(bad.reshape(-1), 24, 3), default_configs())
    assert no_hooks(model)
    assert model.training == was_training


def test_shared_inputs_are_computed_once(monkeypatch):
    import kernelscope.runs.profiling as prof

    calls = []
    real = prof.measure
    monkeypatch.setattr(prof, "measure", lambda x, *a, **k: calls.append(1) or real(x, *a, **k))
    model = tiny_model("llama")
    profile(model, windows_for(n=1), default_configs())
    # per block: q/k/v share one input, gate/up share one: 4 distinct inputs, not 7
    assert len(calls) == 2 * 4


def test_capture_is_scoped_and_not_reentrant():
    model = tiny_model("gpt2")
    modules = {n: m for n, m in model.named_modules() if is_linear(m)}
    seen = []
    cap = LinearInputCapture(modules, lambda n, x: seen.append(n))
    with cap:
        assert cap.attached
        with pytest.raises(RuntimeError):
            cap.__enter__()
        model(input_ids=windows_for().tokens[:1])
    assert not cap.attached and no_hooks(model)
    assert "lm_head" in seen  # it is a Linear, captured because it was asked for here
    assert find_decoder_blocks(model)[0] == "transformer.h"


def test_same_inputs_give_byte_identical_layers_parquet(tmp_path):
    for name in ("a", "b"):
        profile(tiny_model("qwen2"), windows_for(seed=3), default_configs(),
                batch_size=2).save(tmp_path / name)
    assert ((tmp_path / "a" / "layers.parquet").read_bytes()
            == (tmp_path / "b" / "layers.parquet").read_bytes())


def test_bf16_model_profiles_in_float32_close_to_the_fp32_run():
    """bf16 activations are measured in float32: no overflow, no NaN, and kernel fractions within
    2 percentage points of the fp32 model's (the bf16 forward itself rounds every activation)."""
    windows = windows_for(seed=4)
    fp32 = profile(tiny_model("llama"), windows, default_configs()).layers
    bf16_model = tiny_model("llama").to(torch.bfloat16)
    bf16 = profile(bf16_model, windows, default_configs()).layers
    assert bf16.height == fp32.height
    for col in ("kernel_fraction", "bound_mean", "bound_p50", "c_ge_t_fraction", "abs_max"):
        assert bf16[col].is_finite().all(), col
    assert (bf16["nonfinite_elements"] == 0).all()
    diff = (bf16["kernel_fraction"] - fp32["kernel_fraction"]).abs()
    assert diff.max() < 0.02, diff.max()
    # the largest activation of every layer agrees within 5%
    rel = (bf16["abs_max"] / fp32["abs_max"] - 1).abs()
    assert rel.max() < 0.05


def test_forward_hooks_act_inside_the_block_and_are_gone_after_it_error_or_not():
    from kernelscope.capture import ForwardHooks

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    expected = torch.nn.functional.linear(2 * x, lin.weight, lin.bias) + 1  # the hooks' effect, by hand
    seen = []
    with torch.no_grad(), ForwardHooks() as hooks:
        hooks.pre(lin, lambda m, args, kwargs: ((2 * args[0],), kwargs), with_kwargs=True)
        hooks.post(lin, lambda m, args, out: out + 1)
        hooks.post(lin, lambda m, args, out: seen.append(args[0].clone()))
        assert hooks.attached
        assert torch.allclose(lin(x), expected)
    assert torch.equal(seen[0], 2 * x) and not hooks.attached and no_hooks(lin)
    with pytest.raises(RuntimeError, match="forward failed"), ForwardHooks() as hooks:
        hooks.pre(lin, lambda m, args: None)
        raise RuntimeError("forward failed")
    assert no_hooks(lin) and torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
