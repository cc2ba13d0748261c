"""ModelOpt's FP4 targets (``NVFP4_DEFAULT_CFG``, ``MXFP4_DEFAULT_CFG``) against ModelOpt's own pure-torch
quantizers, ``NVFP4QTensor`` and ``MXFP4QTensor`` (what its checkpoint export writes): every element, its
kernel mask and the library's own quotient ``x / s``; the fused q/k/v and gate/up weights under one amax as
the export gives them; each layer's kernel as ``profile`` counts it; the kernels along λ that ``threshold``
searches; and advise's exported file applied by ``mtq.quantize``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import kernelscope as ks
from kernelscope.models import select_linear_layers
from kernelscope.quant import targets as T
from kernelscope.quant.modes import Mode
from kernelscope.runs.evaluate import evaluate, run_scheme
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.threshold import threshold_search
from tests.conftest import tiny_model
from tests.oracles import modelopt_block_op, modelopt_model, modelopt_on_cpu, window_nll
from tests.test_targets import adversarial, same_bits
from tests.test_targets_models import wide_llama, windows
from tests.test_targets_profile import CALIBRATION, WINDOWS, inputs, kernels

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor  # noqa: E402
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402

NV = T.get_target("modelopt:NVFP4_DEFAULT_CFG")
MX = T.get_target("modelopt:MXFP4_DEFAULT_CFG")
DTYPES = (torch.float32, torch.bfloat16)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
"""The midpoints between neighbouring E2M1 magnitudes: a quotient exactly there is a tie."""


# -- ModelOpt's own quantizers ----------------------------------------------------------------------

def nvfp4(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` through ModelOpt's NVFP4QTensor under ``amax`` (its export's ``amax / (6·448)``), back in
    ``x``'s dtype."""
    q, scale, second = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=amax.float() / (6.0 * 448.0))
    return q.dequantize(x.dtype, scale=scale, double_scale=second, block_sizes={-1: 16})


def nvfp4_quotient(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor's own float32 ``x / s`` (before the cast to E2M1)."""
    return NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=amax.float() / (6.0 * 448.0),
                                 keep_high_precision=True)


def nvfp4_block_scales(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor's E4M3 block scales of ``x`` (as float32), one per block of 16."""
    scale, _ = NVFP4QTensor.get_weights_scaling_factor(x, 16, amax.float() / (6.0 * 448.0))
    return scale.float()


def mxfp4(x: torch.Tensor) -> torch.Tensor:
    """``x`` through ModelOpt's MXFP4QTensor, back in ``x``'s dtype."""
    q, e8m0 = MXFP4QTensor.quantize(x, 32)
    return q.dequantize(x.dtype, scale=e8m0, block_sizes={-1: 32})


def mxfp4_quotient(x: torch.Tensor) -> torch.Tensor:
    """``x / s`` with ``s`` the power of two of MXFP4QTensor's E8M0 scale of each block of 32."""
    _, e8m0 = MXFP4QTensor.quantize(x, 32)
    scale = torch.exp2(e8m0.float() - 127)  # (blocks, 1)
    return (x.reshape(-1, 32) / scale).reshape(x.shape)


def just_above(t: torch.Tensor) -> torch.Tensor:
    """The next representable value above each positive element of ``t``, in its dtype."""
    as_int = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return (t.contiguous().view(as_int) + 1).view(t.dtype)


# -- planted edges ----------------------------------------------------------------------------------

def blocks_of(rows: list[list[float]], size: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Blocks of ``size`` (each list padded with small random values below its max), four to a row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for values in rows:
        block = torch.tensor(values, dtype=torch.float64)
        top = block.abs().max() if len(values) else torch.tensor(0.0, dtype=torch.float64)
        pad = (torch.rand(size - len(values), generator=g, dtype=torch.float64) * 2 - 1) * top * 0.9
        out.append(torch.cat([block, pad]))
    while len(out) % 4:
        out.append(torch.zeros(size, dtype=torch.float64))
    return torch.stack(out).reshape(-1, 4 * size).to(dtype)


def nvfp4_edges(dtype: torch.dtype) -> torch.Tensor:
    """A weight whose abs-max 2688 makes ``amax / (6·448)`` exactly 1: a block at scale 448; blocks at
    scales 1 and 1.5 holding every E2M1 midpoint exactly (and their negatives); a zero block; a block whose
    E4M3 scale would underflow (max / 6 < 2⁻⁹), so ModelOpt clamps it to 2⁻⁹, holding the midpoints at
    that scale; a block under an E4M3 subnormal scale; a block of float subnormals."""
    ties = [[s * 6.0] + [s * m for m in MIDPOINTS] + [-s * m for m in MIDPOINTS] for s in (1.0, 1.5)]
    under = [m * 2.0**-9 for m in MIDPOINTS] + [-m * 2.0**-9 for m in MIDPOINTS]
    return blocks_of([[2688.0, -1000.0, 3.0], *ties, [0.0] * 16, under, [0.05, -0.031],
                      [1e-39, -3e-40, 2e-39, 1e-45]], 16, dtype, seed=3)


def mxfp4_edges(dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 32 at scales 1, 2 and 1/8 holding every E2M1 midpoint exactly; a zero block; a block of
    float subnormals (its log2 below -127); blocks whose max is 6·2^k exactly and the next float above it
    (the float32 log2 can round ``log2(max / 6)`` down to k there)."""
    ties = [[s * 6.0] + [s * m for m in MIDPOINTS] + [-s * m for m in MIDPOINTS] for s in (1.0, 2.0, 0.125)]
    edges = []
    for k in (0, 1, 3, 20, -20, -100):
        exact = torch.tensor(6.0 * 2.0**k, dtype=dtype)
        edges += [[float(exact), -0.3 * float(exact)], [float(just_above(exact)), 0.7 * float(exact)]]
    return blocks_of([*ties, [0.0] * 32, [1e-39, -2e-39, 1e-45], *edges], 32, dtype, seed=4)


def weights_of(dtype: torch.dtype, edges) -> list[torch.Tensor]:
    """Weights to check: adversarial random ones (zero rows, ties, subnormals, huge values) and ``edges``."""
    random = [adversarial(shape, dtype, seed) for seed, shape in ((0, (48, 256)), (1, (7, 96)))]
    return [*random, edges(dtype)]


def agree(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Every element the same value, and every nonzero one the same bits (the sign of a zero is
    :func:`test_a_zero_keeps_the_sign_modelopt_gives_it`'s)."""
    nonzero = theirs != 0
    return torch.equal(mine, theirs) and same_bits(mine[nonzero], theirs[nonzero])


# -- elements ---------------------------------------------------------------------------------------

def test_the_planted_edges_are_there():
    """The planted tensors hold what their docstrings say, as ModelOpt's own quantizers see them."""
    for dtype in DTYPES:
        w = nvfp4_edges(dtype)
        amax = w.abs().amax()
        assert float(amax) == 2688.0
        q = nvfp4_quotient(w, amax)
        assert set(MIDPOINTS) <= set(q.abs().unique().tolist())
        scales = nvfp4_block_scales(w, amax).flatten()
        assert {448.0, 1.0, 1.5, 2.0**-9} <= set(scales.unique().tolist())
        underflown = q.reshape(-1, 16)[scales == 2.0**-9]  # blocks whose scale ModelOpt clamped
        assert set(MIDPOINTS) <= set(underflown.abs().unique().tolist())
        assert bool(((scales < 2.0**-6) & (scales > 2.0**-9)).any())  # an E4M3 subnormal scale
        x = mxfp4_edges(dtype)
        q = mxfp4_quotient(x)
        assert set(MIDPOINTS) <= set(q.abs().unique().tolist())
        _, e8m0 = MXFP4QTensor.quantize(x, 32)
        assert int(e8m0.min()) == 0  # a block whose scale is 2^-127
        assert bool((q.abs() > 6).any()) == (dtype is torch.float32)  # float32 log2 rounded down: > 6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_weights_bit_for_bit(dtype):
    for w in weights_of(dtype, nvfp4_edges):
        mine, zero = T.quantize_weight(w, NV.weights)
        amax = w.abs().amax()
        theirs = nvfp4(w, amax)
        assert agree(mine, theirs)
        assert torch.equal(zero, theirs == 0)
        assert torch.equal(zero, nvfp4_quotient(w, amax).abs() <= 0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_inputs_bit_for_bit_under_their_calibrated_amax(dtype):
    """Block scales from each input under the max-calibrated amax; an input beyond that amax saturates
    its block scale at 448 and its elements at ±6."""
    args = NV.input_activations
    for x in weights_of(dtype, nvfp4_edges):
        x = x.reshape(1, *x.shape)  # (B, T, I)
        own = x.abs().amax()
        saturated = False
        for amax in (own, own / 64):
            calibration = T.calibrate(-amax, amax / 2, args, dtype)
            mine, zero = T.quantize_activation(x, args, calibration)
            theirs = nvfp4(x, amax)
            assert agree(mine, theirs)
            assert torch.equal(zero, theirs == 0)
            assert torch.equal(zero, nvfp4_quotient(x, amax).abs() <= 0.25)
            saturated |= bool((nvfp4_block_scales(x, amax) == 448).any()
                              & (nvfp4_quotient(x, amax).abs() > 6).any())
        assert saturated  # the input beyond the calibrated amax was there


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp4_weights_and_inputs_bit_for_bit(dtype):
    for w in weights_of(dtype, mxfp4_edges):
        for mine, zero in (T.quantize_weight(w, MX.weights),
                           T.quantize_activation(w.reshape(1, *w.shape), MX.input_activations, None)):
            mine, zero = mine.reshape(w.shape), zero.reshape(w.shape)
            theirs = mxfp4(w)
            assert agree(mine, theirs)
            assert torch.equal(zero, theirs == 0)
            assert torch.equal(zero, mxfp4_quotient(w).abs() <= 0.25)


def test_a_zero_keeps_the_sign_modelopt_gives_it():
    """ModelOpt's NVFP4 decodes every zero as +0 (a negative element that rounds to zero too); its MXFP4
    gives an exact +0 the sign bit (``torch.sign`` of 0 read as negative). Bit for bit, the zeros too."""
    differ = []
    for dtype in DTYPES:
        w = torch.tensor([[-0.01, 0.01, 0.0, -0.0, 1.0, -1.0] + [0.0] * 26], dtype=dtype)
        if not same_bits(T.quantize_weight(w[:, :16], NV.weights)[0], nvfp4(w[:, :16], w.abs().amax())):
            differ.append(f"NVFP4 {dtype}")
        if not same_bits(T.quantize_weight(w, MX.weights)[0], mxfp4(w)):
            differ.append(f"MXFP4 {dtype}")
    assert not differ


# -- the fused layers -------------------------------------------------------------------------------

FUSED = (("model.layers.0.self_attn", ("q_proj", "k_proj", "v_proj")),
         ("model.layers.0.mlp", ("gate_proj", "up_proj")))
"""Layer 0's groups of linears that share an input (ModelOpt's export fuses their amax)."""


def test_fused_weights_share_their_group_s_amax_as_modelopt_s_export_gives_them():
    """q/k/v and gate/up take one NVFP4 weight amax, their group's, as ModelOpt's export
    (``requantize_resmooth_fused_llm_layers``) gives them: each weight is then the one ModelOpt's quantizer
    makes; under its own amax it is not, and neither is the model ``mtq.quantize`` makes without that step."""
    model = wide_llama(torch.float32)
    wins, calib = windows(1, n=2), windows(2, n=2)
    with torch.no_grad():  # each group's amax well above its first member's own
        model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)
        model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    with modelopt_on_cpu(), torch.no_grad():
        fused = modelopt_model(model, NV.name, calib)
        unfused = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.NVFP4_DEFAULT_CFG),
                               forward_loop=lambda m: [m(input_ids=w[None]) for w in calib.tokens])
        for parent, members in FUSED:
            weights = [model.get_submodule(f"{parent}.{n}").weight.detach() for n in members]
            quantizers = [fused.get_submodule(f"{parent}.{n}").weight_quantizer for n in members]
            stacked = torch.cat([w.flatten() for w in weights])
            joint, group_amax = (stacked.min(), stacked.max()), float(stacked.abs().max())
            for quantizer, w in zip(quantizers, weights, strict=True):
                assert float(quantizer.amax) == group_amax
                assert torch.equal(T.quantize_weight(w, NV.weights, joint)[0], quantizer(w.clone()))
            own = T.quantize_weight(weights[0], NV.weights)[0]
            assert float(weights[0].abs().max()) < group_amax
            assert not torch.equal(own, quantizers[0](weights[0].clone()))
        fused_nll, unfused_nll = window_nll(fused, wins), window_nll(unfused, wins)
    ours = evaluate(model, wins, [parse_scheme(NV.label)], calibration=calib).table.row(0, named=True)
    assert ours["window_nll"] == fused_nll
    assert ours["window_nll"] != unfused_nll


# -- profile: each layer's kernel -------------------------------------------------------------------

@pytest.mark.parametrize(("target", "block", "scale_bits"), [(NV, 16, (8, 4)), (MX, 32, (8, 8))],
                         ids=lambda v: getattr(v, "name", None))
def test_profile_counts_the_zeros_of_modelopt_s_own_block_quantizer(target, block, scale_bits):
    """Each layer's kernel in the profile's own passes is the count of zeros ModelOpt's pure-torch block
    op gives each input captured here (NVFP4 under the input's abs-max max-calibrated on the
    calibration windows; MX blocks need none)."""
    model = tiny_model("llama")
    scheme = parse_scheme(target.label)
    calibration = CALIBRATION if target.needs_calibration else None
    result = ks.profile(model, WINDOWS, [], targets=[scheme], calibration=calibration)
    calibrating = inputs(model, CALIBRATION)
    expected = {}
    for name, xs in inputs(model, WINDOWS).items():
        amax = torch.stack([x.abs().amax() for x in calibrating[name]]).amax()  # max calibration
        expected[name] = sum(int((modelopt_block_op(x, block, amax, 4, 2, *scale_bits) == 0).sum())
                             for x in xs)
    assert kernels(result, scheme.name) == expected
    assert 0 < sum(expected.values()) < sum(x.numel() for xs in inputs(model, WINDOWS).values() for x in xs)


# -- threshold: the kernels along λ -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_kernel_at_lambda_is_modelopt_s_quotient_against_lambda_tau(dtype):
    """K_λ = {|x / s| <= λ·0.25}, ``x / s`` NVFP4QTensor's own float32 quotient, or ``x`` over the power
    of two of MXFP4QTensor's E8M0 scale."""
    x = adversarial((2, 9, 256), dtype, 12)
    amax = x.abs().amax() / 4  # an input beyond the calibrated amax too
    calibration = T.calibrate(-amax, amax, NV.input_activations, dtype)
    for lam in (0.5, 1.0, 3.0, 40.0):
        _, mask = T.quantize_activation(x, NV.input_activations, calibration, kernel_scale=lam)
        assert torch.equal(mask, nvfp4_quotient(x, amax).abs() <= lam * 0.25), lam
        _, mask = T.quantize_activation(x, MX.input_activations, None, kernel_scale=lam)
        assert torch.equal(mask, mxfp4_quotient(x).abs() <= lam * 0.25), lam


def hand_made_removal(model, wins, lam: float) -> tuple[list[float], int, int]:
    """Each window's NLL of ``model`` whose Linear inputs lose, by hooks written here, the elements with
    |x / s| <= λ·0.25 (``s`` from MXFP4QTensor's E8M0 scales); and how many elements were removed, of how
    many."""
    counts = [0, 0]

    def drop(module, args):
        x = args[0]
        removed = mxfp4_quotient(x).abs() <= lam * 0.25
        counts[0] += int(removed.sum())
        counts[1] += x.numel()
        return (torch.where(removed, torch.zeros((), dtype=x.dtype), x),)

    handles = [layer.module.register_forward_pre_hook(drop) for layer in select_linear_layers(model, "")]
    try:
        nll = window_nll(model, wins)
    finally:
        for h in handles:
            h.remove()
    return nll, counts[0], counts[1]


def test_removing_mxfp4_s_kernel_at_lambda_gives_the_hand_made_model():
    """Every window's NLL under ``remove-kernel λ`` of modelopt:MXFP4_DEFAULT_CFG (λ = 3), and the count of
    elements removed, are the hand-made removal's."""
    model = wide_llama(torch.float32)
    wins = windows(21, n=2)
    layers = select_linear_layers(model, "")
    ours = run_scheme(model, wins, Scheme("r", Mode.REMOVE_KERNEL, target=MX, kernel_scale=3.0), layers)
    theirs, removed, total = hand_made_removal(model, wins, 3.0)
    assert ours["window_nll"] == theirs
    assert (ours["kernel_elements"], ours["elements"]) == (removed, total)
    at_one = run_scheme(model, wins, Scheme("r", Mode.REMOVE_KERNEL, target=MX), layers)["window_nll"]
    assert at_one != theirs != window_nll(model, wins)


def test_a_search_along_mxfp4_s_kernels_removes_modelopt_s_quotient_below_lambda_tau():
    """``threshold --family modelopt:MXFP4_DEFAULT_CFG``: each λ of the curve has the hand-made removal's
    kernel fraction and perplexity (λ = 0.5 among them)."""
    model = wide_llama(torch.float32)
    wins = windows(22, n=2)
    result = threshold_search(model, wins, family=parse_scheme(MX.label), tolerance=0.01, steps=1)
    assert result.summary["family"]["label"] == MX.label
    curve = result.summary["searches"][0]["curve"]
    assert 0.5 in [p["lambda"] for p in curve]
    for point in curve:
        nll, removed, total = hand_made_removal(model, wins, point["lambda"])
        assert point["kernel_fraction"] == removed / total, point["lambda"]
        assert point["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-12)


# -- advise: the exported file ----------------------------------------------------------------------

def test_the_exported_nvfp4_config_applied_by_modelopt_is_the_plan_measured():
    """advise's ModelOpt file for modelopt:NVFP4_DEFAULT_CFG, loaded as written and applied by
    ``mtq.quantize`` (its blocks through ModelOpt's pure-torch quantizers, then its export's fusion step),
    gives the model whose perplexity kernelscope measured for the plan: window by window, to the bit."""
    import yaml

    from kernelscope.results import exports
    from kernelscope.runs.advise import advise

    model = wide_llama(torch.float32)
    chosen, calib, check = windows(11, n=2), windows(12, n=2), windows(13, n=2)
    scheme = parse_scheme(NV.label)
    result = advise(model, chosen, scheme, tolerance=1e-3, kernel_groups=(), calibration=calib)
    plan = result.summary["plan"]
    assert plan["kept_layers"] > 0  # the tolerance is tight enough to keep something
    config = yaml.safe_load(result.files[exports.MODELOPT])
    with modelopt_on_cpu():
        theirs = window_nll(modelopt_model(model, NV.name, calib, config=config), check)
    ours = evaluate(model, check, [scheme], ignore=plan["kept_modules"], calibration=calib).table
    assert ours["window_nll"][0].to_list() == theirs
    assert theirs != window_nll(model, check)
