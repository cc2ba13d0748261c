"""ModelOpt targets against ModelOpt itself: its CPU fake-quantization functions, element by element, and
the model ``mtq.quantize`` produces (max calibration on the same windows), window by window, to the bit."""

from __future__ import annotations

import copy

import pytest
import torch

from kernelscope.quant import targets as T
from kernelscope.runs.evaluate import evaluate
from kernelscope.runs.schemes import parse_scheme
from tests.oracles import modelopt_model, modelopt_on_cpu, window_nll
from tests.test_targets import adversarial, same_bits
from tests.test_targets_models import wide_llama, windows

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization import tensor_quant  # noqa: E402

MODELOPT = [t for t in T.TARGETS.values() if t.library == T.MODELOPT]


def reference(x: torch.Tensor, amax: torch.Tensor, args: T.Args) -> torch.Tensor:
    if args.kind is T.Kind.FLOAT:
        return tensor_quant._fp8_eager(x, amax)
    return tensor_quant._tensor_quant(x, amax, num_bits=args.num_bits, unsigned=False, narrow_range=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kind", "bits"), [(T.Kind.INT, 8), (T.Kind.INT, 4), (T.Kind.FLOAT, 8)])
@pytest.mark.parametrize("strategy", [T.Strategy.TENSOR, T.Strategy.CHANNEL])
def test_elements_bit_for_bit(kind, bits, strategy, dtype):
    args = T.Args(bits, kind, strategy, arithmetic=T.Arithmetic.MODELOPT)
    for seed, shape in ((0, (48, 256)), (1, (7, 96))):
        w = adversarial(shape, dtype, seed)
        w[5] = 1e-9  # an abs-max below 2^-24: ModelOpt's zero rule
        mine, zero = T.quantize_weight(w, args)
        amax = w.abs().amax() if strategy is T.Strategy.TENSOR else w.abs().amax(dim=-1, keepdim=True)
        theirs = reference(w, amax, args)
        assert same_bits(mine, theirs), (kind, bits, strategy, seed)
        assert torch.equal(zero, theirs == 0) or kind is T.Kind.INT  # INT: 0 · (1/scale) stays 0
        assert bool((theirs[zero] == 0).all())


def test_a_static_scale_beyond_the_range_reaches_minus_2_to_the_n_minus_1():
    args = T.Args(8, T.Kind.INT, T.Strategy.TENSOR, arithmetic=T.Arithmetic.MODELOPT)
    calibration = T.calibrate(torch.tensor(-1.0), torch.tensor(1.0), args, torch.float32)
    out, _ = T.quantize_activation(torch.tensor([[[-2.0, 2.0, 0.5]]]), args, calibration)
    assert torch.equal(out, torch.tensor([[[-128.0, 127.0, 64.0]]]) / torch.tensor(127.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", MODELOPT, ids=lambda t: t.name)
def test_perplexity_is_the_mtq_model_s(target, dtype):
    """FP4 blocks through ModelOpt's pure-torch quantizers (:func:`modelopt_on_cpu`), fused layers' amax
    unified as its export does; INT and FP8 never reach the block op that replaces."""
    model = wide_llama(dtype)
    wins, calib = windows(1), windows(2, n=2)
    with modelopt_on_cpu():
        theirs = window_nll(modelopt_model(model, target.name, calib), wins)
    row = evaluate(model, wins, [parse_scheme(target.label)], calibration=calib).table.row(0, named=True)
    assert row["window_nll"] == theirs
    assert row["window_nll"] != window_nll(model, wins)


def test_what_modelopt_cannot_be_checked_on_is_refused_with_the_reason():
    for name, reason in (("W4A8_AWQ_BETA_CFG", "AWQ's search"), ("MXFP8_DEFAULT_CFG", "CUDA kernels only")):
        with pytest.raises(ValueError, match=reason):
            T.get_target(f"ModelOpt:{name}")
    for name in ("NVFP4_DEFAULT_CFG", "MXFP4_DEFAULT_CFG"):  # their pure-torch arithmetic is computed
        assert T.get_target(f"ModelOpt:{name}").label == f"modelopt:{name}"


@pytest.mark.parametrize("name", ["INT8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG",
                                  "INT8_SMOOTHQUANT_CFG"])
def test_the_exported_config_applied_by_modelopt_is_the_plan_measured(name):
    """advise's ModelOpt file, loaded as written and applied by ``mtq.quantize``, gives the model whose
    perplexity kernelscope measured for the plan: window by window, to the bit."""
    import yaml

    from kernelscope.results import exports
    from kernelscope.runs.advise import advise

    model = wide_llama(torch.float32)
    chosen, calib, check = windows(11, n=3), windows(12, n=2), windows(13, n=2)
    scheme = parse_scheme(f"modelopt:{name}")
    result = advise(model, chosen, scheme, tolerance=1e-4, kernel_groups=(), calibration=calib)
    plan = result.summary["plan"]
    assert plan["kept_layers"] > 0  # the tolerance is tight enough to keep something
    config = yaml.safe_load(result.files[exports.MODELOPT])
    theirs = window_nll(modelopt_model(model, None, calib, config=config), check)
    ours = evaluate(model, check, [scheme], ignore=plan["kept_modules"], calibration=calib).table
    assert ours["window_nll"][0].to_list() == theirs


def test_smoothquant_s_export_gives_the_layers_that_share_an_input_one_pre_quant_scale():
    """ModelOpt's export averages the pre_quant_scale buffers of q/k/v (and gate/up), which at alpha 1 are
    alike but whose float32 mean need not be; the target follows the export, not mtq.quantize's model."""
    model = wide_llama(torch.float32)
    wins, calib = windows(1), windows(2, n=2)
    ours = evaluate(model, wins, [parse_scheme("modelopt:INT8_SMOOTHQUANT_CFG")],
                    calibration=calib).table.row(0, named=True)["window_nll"]
    assert ours == window_nll(modelopt_model(model, "INT8_SMOOTHQUANT_CFG", calib), wins)
    unfused = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG),
                           forward_loop=lambda m: [m(input_ids=w[None]) for w in calib.tokens])
    assert ours != window_nll(unfused, wins)


def test_smoothquant_s_inputs_are_smoothed_then_quantized_under_the_amax_modelopt_computes():
    """Each layer's smoothed input and its static amax are the mtq model's own: its pre_quant_scale
    buffer times the input, and the input quantizer's amax, on a bfloat16 model."""
    from kernelscope.models import select_linear_layers
    from kernelscope.runs.transforming import TransformBinder

    model = wide_llama(torch.bfloat16)
    calib = windows(2, n=2)
    scheme = parse_scheme("modelopt:INT8_SMOOTHQUANT_CFG")
    layers = select_linear_layers(model)
    bound = TransformBinder(model, layers, calib).bind(scheme.transform)
    theirs = modelopt_model(model, "INT8_SMOOTHQUANT_CFG", calib)
    for layer in layers:
        quantizer = theirs.get_submodule(layer.name).input_quantizer
        step = bound.layers[layer.name].steps[-1]
        assert torch.equal(step.input_amax, quantizer.amax), layer.name
        x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
        assert torch.equal(bound.layers[layer.name].activation(x), x * quantizer.pre_quant_scale)
        assert torch.equal(bound.layers[layer.name].weight(layer.module.weight),
                           theirs.get_submodule(layer.name).weight), layer.name


def test_what_smoothquant_s_target_cannot_take_is_refused():
    scheme = parse_scheme("modelopt:INT8_SMOOTHQUANT_CFG")
    assert "smooths each layer's input first" in scheme.kernel_refusal([], "profile")
    from kernelscope.errors import KernelscopeError
    from kernelscope.quant.transforms import parse_transform

    with pytest.raises(KernelscopeError, match="deploys in the model's own basis"):
        evaluate(wide_llama(torch.float32), windows(1), [scheme], calibration=windows(2, n=2),
                 transforms=[parse_transform("hadamard")])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_smoothquant_s_factors_at_their_edges_are_modelopt_s(dtype):
    """A channel never seen (abs-max 0: factor 1e4), one so small its factor clamps to 1e4 and one so
    large it clamps to 1e-4: the buffer, the smoothed weight and the input amax are mtq.quantize's."""
    from torch import nn

    from kernelscope.quant.transforms import (
        MODELOPT_SMOOTHQUANT,
        ChannelMaxima,
        input_channel_maxima,
        weight_column_maxima,
    )

    torch.manual_seed(0)
    linear = nn.Linear(32, 8, bias=False).to(dtype)
    x = torch.randn(4, 6, 32).to(dtype)
    x[..., 0], x[..., 1], x[..., 2] = 0.0, x[..., 1] * 1e-7, x[..., 2] * 1e5
    model = mtq.quantize(copy.deepcopy(nn.Sequential(linear)), copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG),
                         forward_loop=lambda m: m(x))
    theirs = model[0]
    stats = ChannelMaxima(input_channel_maxima(x), weight_column_maxima(linear.weight), dtype)
    step = MODELOPT_SMOOTHQUANT.bind(1.0, 32, None, stats)
    assert torch.equal(step.buffer, theirs.input_quantizer.pre_quant_scale)
    assert step.buffer[0] == 1e4 and step.factors[1] == 1e4 and step.factors[2] == 1e-4
    assert torch.equal(step.weight(linear.weight.float()).to(dtype), theirs.weight)
    assert torch.equal(step.input_amax, theirs.input_quantizer.amax)
    huge = ChannelMaxima(stats.activation.clone().fill_(2.0**31), stats.weight, dtype)
    with pytest.raises(ValueError, match="2\\^31 or more"):
        MODELOPT_SMOOTHQUANT.bind(1.0, 32, None, huge)
