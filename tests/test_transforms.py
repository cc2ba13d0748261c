"""Transforms of a Linear's input basis (DESIGN.md §1b): the maths against dense references written
here, the identities, SmoothQuant against the computation it replaced, and their use in eval,
threshold and sweep."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from kernelscope.data import make_windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import select_linear_layers
from kernelscope.quant import QuantizerConfig, as_sequences, per_token_step, smoothing_factors
from kernelscope.quant.transforms import (
    IDENTITY,
    RADIX,
    TRANSFORMS,
    ChannelMaxima,
    Hadamard,
    LayerTransform,
    Smoothing,
    default_block,
    fwht,
    parse_transform,
    parse_transforms,
    random_signs,
)
from kernelscope.runs import profile
from kernelscope.runs.evaluate import evaluate, nll_pass, run_scheme
from kernelscope.runs.fakequant import weight_out_in
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.sweep import alpha_sweep
from kernelscope.runs.threshold import threshold_search
from kernelscope.runs.transforming import TransformBinder
from tests import reference as ref
from tests.conftest import tiny_model
from tests.test_eval import hooked_nll


def windows_for(n: int = 2, seqlen: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return make_windows(torch.randint(1, 500, (n * seqlen,), generator=g), seqlen, n)


@functools.lru_cache(maxsize=16)
def dense_hadamard(block: int, width: int) -> torch.Tensor:
    """The block-diagonal (width × width) matrix, float64: H_B = H_2^{⊗k} / √B by torch.kron."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.kron(h, h2)
    return torch.block_diag(*[h / math.sqrt(block)] * (width // block))


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# -- the Walsh–Hadamard transform ---------------------------------------------------------------

@pytest.mark.parametrize("block", [2, 4, 64, 128, 1024])
def test_the_hadamard_block_is_orthonormal_and_symmetric(block):
    h = fwht(torch.eye(block, dtype=torch.float64), block)  # row k: e_k·H
    assert torch.allclose(h @ h.T, torch.eye(block, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h, dense_hadamard(block, block), atol=1e-15)


@pytest.mark.parametrize("width,block", [(2, 2), (8, 2), (96, 32), (576, 64), (192, 64), (1536, 512),
                                         (4096, 4096), (256, 128)])
@pytest.mark.parametrize("radix", [2, RADIX])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwht_equals_the_dense_block_diagonal_product(width, block, radix, dtype):
    g = torch.Generator().manual_seed(width + block)
    x = (torch.randn(3, 5, width, generator=g) * torch.logspace(-3, 3, width)).to(dtype)
    expect = x.double() @ dense_hadamard(block, width)  # (3, 5, I)
    got = fwht(x, block, radix=radix)
    assert got.dtype == dtype and got.shape == x.shape
    scale = expect.abs().amax(dim=-1, keepdim=True)  # rounding grows with the row's magnitude
    if dtype == torch.float32:
        assert ((got.double() - expect).abs() <= 1e-6 * scale).all()
    else:  # computed in float32, rounded once to bfloat16: within one bf16 rounding of the exact value
        assert ((got.double() - expect).abs() <= 2.0**-8 * expect.abs() + 1e-6 * scale).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fwht_is_fast_and_never_forms_a_dense_matrix():
    # I = B = 2^16: a dense H would hold 2^32 elements (16 GiB) and cost 2·N·I² FLOPs.
    width = 2**16
    picks = [0, 1, 12345, width - 1]
    x = torch.zeros(len(picks), width)
    x[range(len(picks)), picks] = 1.0  # rows e_k: e_k·H is row k of H
    with FlopCounterMode(display=False) as flops, LargestTensor() as largest:
        y = fwht(x, width)
    assert largest.largest <= x.numel()
    assert flops.get_total_flops() <= 2 * x.numel() * RADIX  # the inner factor's products only
    j = torch.arange(width)
    for row, k in enumerate(picks):  # H_ij = (-1)^popcount(i & j) / √B in Sylvester order
        parity = torch.zeros(width, dtype=torch.int64)
        bits = k & j
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        assert torch.equal(y[row], (1 - 2 * parity).float() / 256)
    back = fwht(y, width)  # H·H = I
    assert torch.allclose(back, x, atol=1e-6)


def test_default_block_is_the_largest_dividing_power_of_two_up_to_4096():
    assert [default_block(w) for w in (576, 1536, 4096, 11008, 8192, 12288, 96, 7)] == \
        [64, 512, 4096, 256, 4096, 4096, 32, 1]


# -- bound transforms ---------------------------------------------------------------------------

def some_transforms(width: int) -> dict[str, LayerTransform]:
    g = torch.Generator().manual_seed(1)
    stats = ChannelMaxima(torch.rand(width, generator=g) * 10 + 0.01, torch.rand(width, generator=g) + 0.01)
    smooth = TRANSFORMS["smoothquant"].bind(0.5, width, None, stats)
    return {
        "hadamard": parse_transform("hadamard").bind(width),
        "hadamard seeded": parse_transform("hadamard:8").with_seed(7).bind(width),
        "smoothquant": LayerTransform(width, (smooth,)),
        "smoothquant+hadamard": LayerTransform(width, (smooth, Hadamard(width, default_block(width),
                                                                        random_signs(3, width)))),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_transform_never_changes_the_tensor_it_was_given(dtype):
    width = 96
    x = torch.randn(2, 7, width).to(dtype)
    w = torch.randn(40, width).to(dtype)
    x0, w0 = x.clone(), w.clone()
    for name, t in some_transforms(width).items():
        for fn, arg in ((t.activation, x), (t.inverse, x), (t.weight, w)):
            out = fn(arg)
            assert out.dtype == dtype and out.shape == arg.shape, name
            assert out.untyped_storage().data_ptr() != arg.untyped_storage().data_ptr(), name
        assert torch.equal(x, x0) and torch.equal(w, w0), name
    assert LayerTransform(width).activation(x) is x  # the identity hands back its input


def test_inverse_undoes_the_transform_and_weights_keep_the_product():
    width = 192
    x = torch.randn(3, 11, width, dtype=torch.float64)
    w = torch.randn(50, width, dtype=torch.float64)
    for name, t in some_transforms(width).items():
        assert torch.allclose(t.inverse(t.activation(x)), x, rtol=1e-12, atol=1e-12), name
        assert torch.allclose(t.activation(x) @ t.weight(w).T, x @ w.T, rtol=1e-10, atol=1e-10), name
    h = some_transforms(width)["hadamard seeded"]
    d = torch.diag(random_signs(7, width).double())
    dense = d @ dense_hadamard(8, width)  # A = D·H
    assert torch.allclose(h.activation(x), x @ dense, atol=1e-12)
    assert torch.allclose(h.weight(w), w @ dense, atol=1e-12)  # A⁻ᵀ = A
    assert torch.allclose(h.inverse(x), x @ dense.T, atol=1e-12)  # A⁻¹ = H·D


def test_smoothing_step_divides_activations_and_multiplies_weight_columns():
    width = 16
    act, wmax = torch.rand(width) * 5, torch.rand(width)
    s = smoothing_factors(act, wmax, 0.3)
    step = TRANSFORMS["smoothquant"].bind(0.3, width, None, ChannelMaxima(act, wmax))
    assert isinstance(step, Smoothing) and torch.equal(step.factors, s)
    x, w = torch.randn(4, width), torch.randn(3, width)
    assert torch.equal(step.activation(x), x / s) and torch.equal(step.weight(w), w * s)
    with pytest.raises(ValueError, match="calibration"):
        TRANSFORMS["smoothquant"].bind(0.3, width, None, None)


def test_seeds_are_reproducible_and_different_seeds_differ():
    a, b = random_signs(5, 576), random_signs(5, 576)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, random_signs(6, 576))
    assert not torch.equal(a[:64], random_signs(5, 64))  # the width is part of the seed
    x = torch.randn(2, 576)
    seeded = [parse_transform("hadamard").with_seed(s).bind(576).activation(x) for s in (5, 5, 6)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.allclose(seeded[0], seeded[2])
    plain = parse_transform("hadamard").bind(576).activation(x)
    assert not torch.allclose(seeded[0], plain)
    assert parse_transform("smoothquant").with_seed(5).seed is None  # a seed only where a step takes it


def test_composition_applies_in_order():
    width = 64
    stats = ChannelMaxima(torch.rand(width) * 8 + 0.1, torch.rand(width) + 0.1)
    smooth = TRANSFORMS["smoothquant"].bind(0.5, width, None, stats)
    rotate = Hadamard(width, 32)
    x = torch.randn(5, width, dtype=torch.float64)
    forward, backward = LayerTransform(width, (smooth, rotate)), LayerTransform(width, (rotate, smooth))
    assert torch.allclose(forward.activation(x), fwht(x / smooth.factors, 32))
    assert torch.allclose(backward.activation(x), fwht(x, 32) / smooth.factors)
    assert not torch.allclose(forward.activation(x), backward.activation(x))
    assert forward.label == "smoothquant:0.5+hadamard:32" and backward.label == "hadamard:32+smoothquant:0.5"
    spec = parse_transform("smoothquant+hadamard")
    assert [s.entry.name for s in spec.steps] == ["smoothquant", "hadamard"]
    assert spec.needs_calibration and spec.seeded


def test_labels_are_canonical():
    assert parse_transform(" None ").label == "none" and parse_transform("none") == IDENTITY
    assert parse_transform("HADAMARD:64").label == "hadamard:64"
    assert parse_transform("hadamard").label == "hadamard"
    assert parse_transform("smoothquant").label == "smoothquant:0.5"
    assert parse_transform("smoothquant:0.50").label == "smoothquant:0.5"
    assert parse_transform("smoothquant:1").label == "smoothquant:1"
    assert parse_transform("smoothquant:0.123456789").label == "smoothquant:0.123456789"
    assert parse_transform("smoothquant:0.6 + hadamard:128").label == "smoothquant:0.6+hadamard:128"
    assert [s.label for s in parse_transforms(["none,hadamard", "smoothquant+hadamard:8"])] == \
        ["none", "hadamard", "smoothquant:0.5+hadamard:8"]


@pytest.mark.parametrize("bad,message", [
    ("", "empty transform"), ("rotate", "unknown transform 'rotate'"),
    ("none+hadamard", "identity cannot be composed"),
    ("hadamard:", "nothing after ':'"), ("hadamard:3", "power of two"), ("hadamard:1", "power of two"),
    ("hadamard:0", "power of two"), ("hadamard:x", "whole number"), ("hadamard:-4", "power of two"),
    ("smoothquant:1.5", "α must be a number in [0, 1]"), ("smoothquant:nan", "α must be"),
    ("smoothquant:a", "α must be"), ("hadamard+hadamard:8", "given twice"),
    ("hadamard+", "unknown transform ''"),
])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=None) as info:
        parse_transform(bad)
    assert message in str(info.value)


def test_widths_a_block_cannot_apply_to_are_refused():
    with pytest.raises(ValueError, match="B=64 does not divide its 96 input channels"):
        parse_transform("hadamard:64").bind(96)
    with pytest.raises(ValueError, match="no power of two of at least 2 divides its 7 input channels"):
        parse_transform("hadamard").check(7)
    with pytest.raises(ValueError, match="given twice"):
        parse_transforms(["hadamard", "HADAMARD"])
    with pytest.raises(ValueError, match="applies smoothquant twice"):
        parse_transform("smoothquant").then(parse_transform("smoothquant:0.7+hadamard"))
    model = tiny_model("llama")
    binder = TransformBinder(model, select_linear_layers(model))
    with pytest.raises(KernelscopeError,
                       match=r"hadamard:64: layer model\.layers\.0\.self_attn\.q_proj: B=64"):
        binder.bind(parse_transform("hadamard:64"))  # the tiny model's width is 32
    with pytest.raises(ValueError, match="needs calibration windows"):
        binder.bind(parse_transform("smoothquant"))


# -- identities on models -----------------------------------------------------------------------

def linear_inputs(model, windows) -> dict[str, torch.Tensor]:
    """The input of every selected Linear on the first window (a copy)."""
    seen, handles = {}, []

    def keep(name, x) -> None:
        seen.setdefault(name, x.detach().clone())

    handles.extend(
        layer.module.register_forward_pre_hook(lambda m, args, name=layer.name: keep(name, args[0]))
        for layer in select_linear_layers(model))
    try:
        with torch.no_grad():
            model(input_ids=windows.tokens[:1])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_every_transform_leaves_each_linear_output_unchanged(family):
    model = tiny_model(family)
    layers = select_linear_layers(model)
    inputs = linear_inputs(model, windows_for())
    binder = TransformBinder(model, layers, windows_for(seed=4))
    specs = ["hadamard", "hadamard:2", "smoothquant", "smoothquant:0.8+hadamard", "hadamard:16+smoothquant"]
    for text in specs:
        for seed in (None, 11):
            bound = binder.bind(parse_transform(text).with_seed(seed))
            for layer in layers:
                x, module = inputs[layer.name], layer.module
                w = weight_out_in(module).detach()  # (O, I), GPT-2's Conv1D included
                t = bound.layers[layer.name]
                with torch.no_grad():
                    expect = module(x)
                    got = t.activation(x) @ t.weight(w).T + (0 if module.bias is None else module.bias)
                tol = 1e-5 * float(expect.abs().max())
                assert (got - expect).abs().max() <= tol, (family, text, seed, layer.name)
    assert no_hooks(model)


def test_one_calibration_pass_serves_every_transform_with_the_same_steps_before_smoothquant(monkeypatch):
    import kernelscope.runs.transforming as T

    passes = []
    original = T.calibration_maxima
    monkeypatch.setattr(T, "calibration_maxima", lambda *a, **k: passes.append(1) or original(*a, **k))
    model = tiny_model("llama")
    binder = TransformBinder(model, select_linear_layers(model), windows_for(seed=4))
    for text, seed in (("smoothquant", None), ("smoothquant:0.7", None), ("smoothquant+hadamard", 3),
                       ("hadamard:8+smoothquant", None), ("hadamard:8+smoothquant:0.2", None)):
        binder.bind(parse_transform(text).with_seed(seed))
    assert len(passes) == 2 and binder.calibrated


def test_calibration_sees_each_step_in_the_basis_before_it():
    # hadamard+smoothquant: SmoothQuant's maxima are those of the rotated input and rotated weight.
    model = tiny_model("llama")
    layers = select_linear_layers(model)
    calib = windows_for(seed=4)
    binder = TransformBinder(model, layers, calib)
    bound = binder.bind(parse_transform("hadamard:8+smoothquant"))
    rotate = parse_transform("hadamard:8").bind(32)
    act: dict[str, torch.Tensor] = {}
    handles = [layer.module.register_forward_pre_hook(
        lambda m, args, name=layer.name: act.__setitem__(name, torch.maximum(
            act.get(name, torch.zeros(32)), rotate.activation(args[0]).abs().reshape(-1, 32).amax(0))))
        for layer in layers if layer.in_features == 32]
    try:
        with torch.no_grad():
            for row in calib.tokens:
                model(input_ids=row[None])
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        if layer.in_features != 32:
            continue
        w_max = rotate.weight(weight_out_in(layer.module).detach()).abs().amax(0)
        smooth = bound.layers[layer.name].steps[1]
        assert torch.allclose(smooth.factors, smoothing_factors(act[layer.name], w_max, 0.5), rtol=1e-6)


def old_smoothquant_nll(model, windows, calibration, alpha: float, bits: int = 8) -> tuple[list[float], int]:
    """The w8a8-smoothquant computation as it was before transforms existed, kept as the reference:
    factors from calibration maxima, activations ``(x.float() / s).to(dtype)`` then per-token INT,
    weights ``(w.float() * s).to(dtype)`` then INT per output channel."""
    layers = select_linear_layers(model)
    act_max: dict[str, torch.Tensor] = {}

    def observe(name, x):
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

    handles = [layer.module.register_forward_pre_hook(lambda mod, args, n=layer.name: observe(n, args[0]))
               for layer in layers]
    with torch.inference_mode():
        for row in calibration.tokens:
            model(input_ids=row[None], use_cache=False)
    for h in handles:
        h.remove()
    factors = {layer.name: smoothing_factors(act_max[layer.name],
                                             weight_out_in(layer.module).detach().abs().amax(dim=0).float(),
                                             alpha) for layer in layers}
    kernel = [0]

    def pre(mod, args, name):
        x = (args[0].float() / factors[name]).to(args[0].dtype)
        seqs = as_sequences(x, windows.seqlen)
        out = ref.int_fake_quantize(seqs, per_token_step(seqs, bits), bits)
        kernel[0] += int((out == 0).sum())
        return (out.reshape(x.shape),)

    originals = {}
    for layer in layers:
        w = weight_out_in(layer.module).detach()
        smoothed = (w.float() * factors[layer.name]).to(w.dtype)
        wq = ref.int_fake_quantize(smoothed, ref.int_weight_step(smoothed, bits), bits)
        originals[layer.name] = layer.module.weight.data
        layer.module.weight.data = wq if isinstance(layer.module, torch.nn.Linear) else wq.t().contiguous()
        handles.append(layer.module.register_forward_pre_hook(
            lambda mod, args, n=layer.name: pre(mod, args, n)))
    try:
        with torch.inference_mode():
            sums, per_window = nll_pass(model, windows)
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.module.weight.data = originals[layer.name]
    return (sums / per_window).tolist(), kernel[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_smoothquant_scheme_is_the_transform_and_gives_todays_perplexity_bit_for_bit(family):
    model = tiny_model(family)
    windows, calib = windows_for(), windows_for(n=3, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate(model, windows, [parse_scheme("w8a8-smoothquant", smooth_alpha=0.6)],
                   calibration=calib, transforms=[IDENTITY])
    same = evaluate(model, windows, [parse_scheme("w8a8-per-token")], calibration=calib,
                    transforms=[parse_transform("smoothquant:0.6")])
    window_nll, kernel = old_smoothquant_nll(model, windows, calib, 0.6)
    row, other = res.table.row(0, named=True), same.table.row(0, named=True)
    # the same numbers, bit for bit
    assert row["window_nll"] == window_nll and row["kernel_elements"] == kernel
    assert other["window_nll"] == row["window_nll"] and other["kernel_elements"] == kernel
    assert row["transform"] == other["transform"] == "smoothquant:0.6"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and no_hooks(model)


# -- in evaluation --------------------------------------------------------------------------------

def test_fp_under_any_transform_is_fp_and_rows_name_their_transform():
    model = tiny_model("llama")
    windows = windows_for()
    specs = [IDENTITY, parse_transform("hadamard"), parse_transform("hadamard:2").with_seed(3),
             parse_transform("smoothquant+hadamard").with_seed(3)]
    res = evaluate(model, windows, [parse_scheme("fp")], transforms=specs, calibration=windows_for(seed=8))
    rows = res.table.to_dicts()
    assert [r["transform"] for r in rows] == ["none", "hadamard", "hadamard:2", "smoothquant:0.5+hadamard"]
    assert [r["transform_seed"] for r in rows] == [None, None, 3, 3]
    assert rows[1]["transform_layers"] == "hadamard:32 (I=32), hadamard:64 (I=64)"
    assert rows[3]["transform_layers"] == ("smoothquant:0.5+hadamard:32 (I=32), "
                                           "smoothquant:0.5+hadamard:64 (I=64)")
    for r in rows[1:]:
        assert abs(r["perplexity"] / rows[0]["perplexity"] - 1) < 1e-4, r["transform"]
        assert r["kernel_fraction"] is None
    assert res.summary["transforms"]["given"] == [r["transform"] for r in rows]


def rotated_reference_nll(model, windows, block: int, act_bits: int | None, weight_bits: int | None,
                          remove: bool = False) -> float:
    """Per-token NLL with each Linear's input rotated by the dense block-diagonal H built here and
    quantized (or its per-token kernel zeroed) by formula, and its weight rotated (W·H) and quantized
    per output channel: the transformed basis written out independently of kernelscope."""
    layers = select_linear_layers(model)
    originals, handles = {}, []
    for layer in layers:
        h = dense_hadamard(block, layer.in_features).float()
        conv1d = not isinstance(layer.module, torch.nn.Linear)
        w = layer.module.weight.data
        wr = (w.t() if conv1d else w) @ h  # (O, I)
        if weight_bits is not None:
            q = 2 ** (weight_bits - 1) - 1
            step = torch.clamp(wr.abs().max(dim=1, keepdim=True).values / q, min=1e-5)
            wr = torch.clamp(torch.round(wr / step), -q, q) * step
        originals[layer.name] = w
        layer.module.weight.data = wr.t().contiguous() if conv1d else wr

        def pre(mod, args, h=h):
            xr = args[0] @ h
            if act_bits is None:
                return (xr,)
            seqs = xr if xr.dim() == 3 else xr[None]
            out = torch.empty_like(seqs)
            q = 2 ** (act_bits - 1) - 1
            for b in range(seqs.shape[0]):
                step = ref.step_for_sequence(seqs[b], "per_token", act_bits, None)
                r = torch.round(seqs[b] / step)
                out[b] = torch.where(r == 0, 0.0, seqs[b]) if remove else torch.clamp(r, -q, q) * step
            return (out.reshape(xr.shape),)

        handles.append(layer.module.register_forward_pre_hook(pre))
    return hooked_nll(model, windows, handles, originals)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fake_quantization_and_kernel_removal_act_in_the_rotated_basis(family):
    model = tiny_model(family)
    windows = windows_for()
    layers = select_linear_layers(model)
    bound = TransformBinder(model, layers).bind(parse_transform("hadamard:16"))
    w4a4 = run_scheme(model, windows, parse_scheme("w4a4-per-token"), layers, transform=bound)
    assert w4a4["nll"] == pytest.approx(rotated_reference_nll(model, windows, 16, 4, 4), rel=1e-5)
    # remove-kernel with fp weights maps the activation back (T⁻¹(R(T(x))), original W); the reference
    # feeds R(T(x)) to W·H: the same product up to rounding
    removed = run_scheme(model, windows, parse_scheme("remove-kernel-per-token", bits=4), layers,
                         transform=bound)
    assert removed["nll"] == pytest.approx(rotated_reference_nll(model, windows, 16, 4, None, remove=True),
                                           rel=1e-5)
    plain = run_scheme(model, windows, parse_scheme("remove-kernel-per-token", bits=4), layers)
    assert removed["kernel_fraction"] < plain["kernel_fraction"]  # the rotation spreads the outliers
    # weights quantized in the rotated basis: R(T(x)) meets Q(W·H)
    with_w8 = run_scheme(model, windows, parse_scheme("remove-kernel-per-token", bits=4, weight_bits=8),
                         layers, transform=bound)
    assert with_w8["nll"] == pytest.approx(rotated_reference_nll(model, windows, 16, 4, 8, remove=True),
                                           rel=1e-5)
    assert no_hooks(model)


def all_linear_inputs(model, windows) -> dict[str, list[torch.Tensor]]:
    """Every selected Linear's input on each window (copies), one forward pass per window."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [layer.module.register_forward_pre_hook(
        lambda m, args, name=layer.name: seen.setdefault(name, []).append(args[0].detach().clone()))
        for layer in select_linear_layers(model)]
    try:
        with torch.no_grad():
            for w in range(len(windows)):
                model(input_ids=windows.tokens[w : w + 1])
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_profile_counts_every_configuration_in_every_basis_in_one_pass(family, monkeypatch):
    import kernelscope.runs.profiling as prof

    model = tiny_model(family)
    windows, calib = windows_for(n=3), windows_for(n=2, seed=9)
    layers = select_linear_layers(model)
    configs = [QuantizerConfig("per_token", 8), QuantizerConfig("crossquant", 4, 0.15),
               QuantizerConfig("per_token", 4)]
    specs = [IDENTITY, parse_transform("hadamard:8"), parse_transform("hadamard").with_seed(3),
             parse_transform("smoothquant:0.6")]
    forwards = []
    real_forward = prof.forward_windows
    monkeypatch.setattr(prof, "forward_windows", lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    result = profile(model, windows, configs, transforms=specs, calibration=calib, batch_size=2)
    assert len(forwards) == 2  # ceil(3 / 2) batches: every basis in the same passes
    plain = profile(model, windows, configs, batch_size=2)
    none_rows = result.layers.filter(result.layers["transform"] == "none")
    assert none_rows.equals(plain.layers)  # the identity is today's profile, column for column
    assert result.model_level.filter(result.model_level["transform"] == "none").equals(plain.model_level)
    bound = {t.label: t for t in (TransformBinder(model, layers, calib).bind(spec) for spec in specs)}
    inputs = all_linear_inputs(model, windows)
    rows = {(r["transform"], r["layer"], r["config"]): r for r in result.layers.iter_rows(named=True)}
    assert len(rows) == len(specs) * len(layers) * len(configs)
    for label, t in bound.items():
        for layer in layers:
            seqs = [t.layers[layer.name].activation(x)[0] for x in inputs[layer.name]]  # (T, I) each
            for cfg in configs:
                expect = sum(ref.kernel_count(x, cfg.quantizer, cfg.bits, cfg.alpha) for x in seqs)
                assert rows[(label, layer.name, cfg.label)]["kernel_elements"] == expect, (
                    label, layer.name, cfg.label)
    # the first layer sees the model's own input
    removal = run_scheme(model, windows, Scheme("count", "remove_kernel", configs[0], kernel_scale=1.0),
                         layers[:1], transform=bound["hadamard:8"])
    assert (removal["kernel_elements"]
            == rows[("hadamard:8", layers[0].name, configs[0].label)]["kernel_elements"])
    level = {(r["transform"], r["config"]): r for r in result.model_level.iter_rows(named=True)}
    for label in bound:
        per_layer = result.layers.filter(result.layers["transform"] == label)
        assert level[(label, "per_token int4")]["kernel_elements"] == per_layer.filter(
            per_layer["config"] == "per_token int4")["kernel_elements"].sum()
    assert [t["transform"] for t in result.summary["transforms"]] == ["none", "hadamard:8", "hadamard",
                                                                      "smoothquant:0.6"]
    assert (result.summary["transforms"][2]["transform_seed"] == 3
            and result.summary["calibration"] is not None)
    assert no_hooks(model)


def test_profile_measures_a_shared_input_once_per_basis_unless_calibrated(monkeypatch):
    import kernelscope.runs.profiling as prof

    calls = []
    real = prof.measure
    monkeypatch.setattr(prof, "measure", lambda x, *a, **k: calls.append(1) or real(x, *a, **k))
    model = tiny_model("llama")
    configs = [QuantizerConfig("per_token", 8)]
    profile(model, windows_for(n=1), configs, transforms=[IDENTITY, parse_transform("hadamard")])
    assert len(calls) == 2 * 2 * 4  # two blocks, two bases, four distinct inputs (q/k/v and gate/up shared)
    calls.clear()
    profile(model, windows_for(n=1), configs, transforms=[parse_transform("smoothquant")],
            calibration=windows_for(seed=2))
    assert len(calls) == 2 * 7  # SmoothQuant's factors are each layer's own: every layer measured


def test_weights_are_counted_in_each_basis_as_deployed_with_it():
    model = tiny_model("llama")
    layers = select_linear_layers(model)
    formats = [QuantizerConfig("per_token", 4), QuantizerConfig("mxfp4", 4)]
    result = profile(model, windows_for(n=1), [QuantizerConfig("per_token", 8)], weight_formats=formats,
                     transforms=[IDENTITY, parse_transform("hadamard:16")])
    weights = {(r["transform"], r["layer"], r["config"]): r for r in result.weights.iter_rows(named=True)}
    bound = TransformBinder(model, layers).bind(parse_transform("hadamard:16"))
    for layer in layers:
        w = weight_out_in(layer.module).detach()  # (O, I)
        rotated = w @ dense_hadamard(16, w.shape[1]).float()  # W·H⁻ᵀ = W·H: H orthonormal and symmetric
        assert torch.allclose(bound.layers[layer.name].weight(w), rotated, atol=1e-6)
        for label, matrix in (("none", w), ("hadamard:16", bound.layers[layer.name].weight(w))):
            expect = ref.kernel_count(matrix, "per_token", 4, None)  # one step per output channel
            assert weights[(label, layer.name, "per_token int4")]["kernel_elements"] == expect
    level = {(r["transform"], r["config"]): r for r in result.summary["weights_model_level"]}
    assert set(level) == {(t, c.label) for t in ("none", "hadamard:16") for c in formats}


def test_a_resumed_profile_with_transforms_is_the_uninterrupted_one(tmp_path):
    model, windows = tiny_model("llama"), windows_for(n=4)
    configs, specs = [QuantizerConfig("per_token", 4)], [IDENTITY, parse_transform("hadamard").with_seed(5)]
    whole = profile(model, windows, configs, transforms=specs, batch_size=2)
    checkpoint = tmp_path / ".run.checkpoint"

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile(model, windows, configs, transforms=specs, batch_size=2, checkpoint=checkpoint, progress=stop)
    changed = r"transforms: \[\[none, None\], \[hadamard, 5\]\] in the checkpoint, \[\[none, None\]\] now"
    with pytest.raises(KernelscopeError, match=changed):
        profile(model, windows, configs, transforms=specs[:1], batch_size=2, checkpoint=checkpoint,
                resume=True)
    resumed = profile(model, windows, configs, transforms=specs, batch_size=2, checkpoint=checkpoint,
                      resume=True)
    assert resumed.summary["resumed_from_window"] == 2 and resumed.layers.equals(whole.layers)


def test_profile_refuses_a_transform_given_twice_or_uncalibrated():
    model, windows = tiny_model("llama"), windows_for(n=1)
    configs = [QuantizerConfig("per_token", 8)]
    with pytest.raises(ValueError, match="given twice"):
        profile(model, windows, configs,
                transforms=[parse_transform("hadamard"), parse_transform("Hadamard")])
    with pytest.raises(ValueError, match="needs calibration windows"):
        profile(model, windows, configs, transforms=[parse_transform("smoothquant")])
    assert no_hooks(model)


def test_threshold_and_sweep_run_once_per_transform():
    model = tiny_model("llama")
    windows = windows_for()
    specs = [IDENTITY, parse_transform("hadamard")]
    int2 = QuantizerConfig("per_token", 2)  # λ runs up to 2·qmax = 2: two evaluations a search
    res = threshold_search(model, windows, family=int2, tolerance=1.0, steps=0, transforms=specs)
    searches = res.summary["searches"]
    assert [s["transform"] for s in searches] == ["none", "hadamard"]
    assert set(res.table["transform"].to_list()) == {"none", "hadamard"}
    assert all(len(s["verdicts"]) == 4 and len(s["actual_kernels"]) == 4 for s in searches)
    layers = select_linear_layers(model)
    bound = TransformBinder(model, layers).bind(specs[1])
    at_one = res.table.filter((res.table["transform"] == "hadamard")
                              & (res.table["lambda"] == 1.0)).row(0, named=True)
    removal = run_scheme(model, windows, parse_scheme("remove-kernel-per-token", bits=2), layers,
                         transform=bound)
    assert at_one["kernel_elements"] == removal["kernel_elements"] and at_one["nll"] == removal["nll"]

    sweep = alpha_sweep(model, windows, [1.0], transforms=specs).table.to_dicts()
    assert [(r["transform"], r["alpha"]) for r in sweep] == [("none", None), ("none", 1.0), ("hadamard", 1.0)]
    pt = run_scheme(model, windows, parse_scheme("w8a8-per-token"), layers, transform=bound)
    assert sweep[2]["perplexity"] == pt["perplexity"] and sweep[2]["kernel_fraction"] == pt["kernel_fraction"]
    counted = profile(model, windows, [QuantizerConfig("per_token", 8)], transforms=[specs[1]]).model_level
    assert sweep[2]["fp_kernel_fraction"] == counted["kernel_fraction"][0]
    assert no_hooks(model)


# -- the command line -----------------------------------------------------------------------------

def test_eval_cli_runs_every_scheme_under_each_transform(capsys, tiny_llama_dir, text_file):
    import json

    from tests.test_cli import run_cli

    code, stdout, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "32", "--scheme", "fp,w4a4-per-token", "--transform", "none",
                                   "--transform", "Hadamard", "--transform-seed", "2", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["results"]
    assert [(r["scheme"], r["transform"], r["transform_seed"]) for r in rows] == [
        ("fp", "none", None), ("fp", "hadamard", 2), ("w4a4-per-token", "none", None),
        ("w4a4-per-token", "hadamard", 2)]
    assert abs(rows[1]["perplexity"] / rows[0]["perplexity"] - 1) < 1e-4


@pytest.mark.parametrize("args,message", [
    (["eval", "--transform-seed", "3"],
     "--transform-seed has no effect here: it seeds the random signs of a hadamard"),
    (["sweep", "--transform", "smoothquant", "--transform-seed", "3"], "--transform-seed has no effect here"),
    (["eval", "--transform", "hadamard:128"], ("--transform hadamard:128: layer "
                                               "model.layers.0.self_attn.q_proj: B=128 does not divide its "
                                               "32 input channels")),
    (["threshold", "--transform", "none,hadamard:64"],
     "--transform hadamard:64: layer model.layers.0.self_attn.q_proj"),
    (["eval", "--transform", "hadamard:3"], "--transform 'hadamard:3': hadamard: B must be a power of two"),
    (["eval", "--transform", "smoothquant:2"],
     "--transform 'smoothquant:2': smoothquant: α must be a number in [0, 1]"),
    (["eval", "--transform", "rotate"], "--transform 'rotate': unknown transform 'rotate'"),
    (["eval", "--transform", "hadamard,HADAMARD"], "--transform HADAMARD is given twice (as hadamard)"),
    (["eval", "--transform", ","], "--transform needs at least one value"),
    (["eval", "--scheme", "w8a8-smoothquant", "--transform", "smoothquant+hadamard"],
     ("--scheme w8a8-smoothquant with --transform smoothquant+hadamard: smoothquant:0.5 followed by "
      "smoothquant:0.5+hadamard applies smoothquant twice")),
    (["eval", "--transform", "hadamard", "--calib-nsamples", "8"], "--calib-nsamples has no effect here"),
    (["sweep", "--calib-dataset", "pydoc"], "--calib-dataset has no effect here"),
    (["eval", "--transform", "smoothquant", "--smooth-alpha", "0.7"], "--smooth-alpha has no effect here"),
    (["profile", "--transform-seed", "3"],
     "--transform-seed has no effect here: it seeds the random signs of a hadamard"),
    (["profile", "--transform", "hadamard:64"],
     "--transform hadamard:64: layer model.layers.0.self_attn.q_proj"),
    (["profile", "--transform", "none,NONE"], "--transform NONE is given twice (as none)"),
    (["profile", "--transform", "hadamard", "--calib-dataset", "pydoc"],
     "--calib-dataset has no effect here"),
    (["profile", "--transform", "smoothquant", "--calib-nsamples", "0"],
     "--calib-nsamples must be at least 1"),
])
def test_bad_transform_options_are_refused(args, message, capsys, tmp_path, tiny_llama_dir, text_file):
    from tests.test_trust import assert_refused

    command, *rest = args
    assert_refused(capsys, [command, str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "32", *rest],
                   message, tmp_path)


def test_profile_cli_counts_each_basis_and_shows_them_side_by_side(capsys, tmp_path, tiny_llama_dir,
                                                                   text_file):
    import json

    import polars as pl

    from tests.test_cli import run_cli

    args = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "32", "-q", "per_token",
            "-b", "4", "--transform", "none,hadamard:16", "--transform", "smoothquant:0.7", "--calib-dataset",
            str(text_file), "--calib-nsamples", "2"]
    code, stdout, stderr = run_cli(capsys, *args, "-o", str(tmp_path / "run"))
    assert code == 0, stderr
    shown = " ".join(stdout.split())
    assert "Model-level kernel per transform" in shown and " pt │" in shown  # the change from none, in points
    layers = pl.read_parquet(tmp_path / "run" / "layers.parquet")
    assert layers["transform"].unique(maintain_order=True).to_list() == ["none", "hadamard:16",
                                                                         "smoothquant:0.7"]
    weights = pl.read_parquet(tmp_path / "run" / "weights.parquet")
    assert weights["transform"].unique(maintain_order=True).to_list() == ["none", "hadamard:16",
                                                                          "smoothquant:0.7"]
    code, stdout, stderr = run_cli(capsys, *args, "--json")
    summary = json.loads(stdout)
    assert [t["transform"] for t in summary["transforms"]] == ["none", "hadamard:16", "smoothquant:0.7"]
    assert summary["calibration"]["windows"]["windows"] == 2 and summary["calibration"]["text"]["source"]
    level = {(r["transform"], r["config"]): r["kernel_fraction"] for r in summary["model_level"]}
    assert level[("hadamard:16", "per_token int4")] != level[("none", "per_token int4")]


def test_the_transform_help_names_every_registered_transform():
    from kernelscope.cli import options
    from kernelscope.quant.transforms import COMPOSE, NONE

    help_text = options.Transform.__metadata__[0].help
    for entry in TRANSFORMS.values():
        assert entry.usage in help_text and entry.default_text.split(",")[0] in help_text, entry.name
    assert NONE in help_text and f"with {COMPOSE}" in help_text


def test_fwht_under_autograd_gives_the_same_values():
    with torch.inference_mode():  # factors and signs first made in inference mode serve autograd too
        fwht(torch.randn(2, 1024), 512)
        seeded = parse_transform("hadamard:512").with_seed(1).bind(1024)
        seeded.activation(torch.randn(2, 1024))
    x = torch.randn(3, 1024, requires_grad=True)
    seeded.activation(x).sum().backward()
    x.grad = None
    y = fwht(x, 512)
    y.square().sum().backward()
    assert torch.equal(y.detach(), fwht(x.detach(), 512))
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-5)  # |x·H|² = |x|²: H orthonormal


def test_smoothquant_on_the_output_projection_is_calibrated_on_every_position():
    from kernelscope.runs.transforming import calibration_maxima

    model = tiny_model("llama")
    layers = select_linear_layers(model, include_lm_head=True)
    head = next(layer for layer in layers if layer.module is model.get_output_embeddings())
    calib = windows_for(n=2, seed=3)
    maxima = calibration_maxima(model, [head], calib,
                                {head.name: LayerTransform(head.in_features)})[head.name]
    seen = []
    handle = head.module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().abs().amax(dim=(0, 1))))
    try:
        with torch.no_grad():
            model(input_ids=calib.tokens)  # every position's logits
    finally:
        handle.remove()
    assert torch.equal(maxima, seen[0])  # the profile, with the output projection, sees every position too
