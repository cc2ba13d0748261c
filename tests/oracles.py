"""The deploying library as an oracle: a model quantized by compressed-tensors itself (its
``apply_quantization_config`` and quantized forward), its scales set as llm-compressor's min-max observers
compute them (written out here), and each window's NLL of such a model. Used by the tests and by
``benchmarks/targets.py``."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from compressed_tensors import quantization as ct
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam


def plain(value) -> str:
    return str(getattr(value, "value", value))


FUSED_LAYER_NAMES = [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"),
                     ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3")]
"""llm-compressor 0.14's fused layers (``fuse_weight_observers``): a module holding all of one group has
their tensor-group weights share one global scale, from the min and max of all of them."""


def fused_ranges(model, linears: dict) -> dict:
    """Each quantized Linear of a fused group -> the group's weight min and max, found as llm-compressor
    finds them: by the attributes of every module."""
    quantized = {id(m) for m in linears.values()}
    names = {id(m): n for n, m in linears.items()}
    out = {}
    for parent in model.modules():
        for group in FUSED_LAYER_NAMES:
            members = [getattr(parent, a, None) for a in group]
            if any(m is None for m in members) or not all(id(m) in quantized for m in members):
                continue
            lo = torch.stack([m.weight.data.min() for m in members]).min()
            hi = torch.stack([m.weight.data.max() for m in members]).max()
            out.update({names[id(m)]: (lo, hi) for m in members})
    return out


def library_model(model, name: str, calibration, scheme=None, ignore=("lm_head",)):
    """``model`` (a copy) quantized by compressed-tensors with llm-compressor's preset ``name`` (or with
    ``scheme``, a QuantizationScheme), ``ignore`` left in full precision."""
    model = copy.deepcopy(model)
    if scheme is None:
        scheme = ct.QuantizationScheme(targets=["Linear"], **copy.deepcopy(PRESET_SCHEMES[name]))
    ct.apply_quantization_config(model, ct.QuantizationConfig(config_groups={"group_0": scheme},
                                                              ignore=list(ignore)))
    linears = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)}
    act = scheme.input_activations
    if act is not None and act.dynamic is not True:  # static_minmax over the calibration windows, fp model
        seen = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, n=n: seen.__setitem__(n, [torch.minimum(seen[n][0], args[0].min()),
                                                        torch.maximum(seen[n][1], args[0].max())]
                                                    if n in seen else [args[0].min(), args[0].max()]))
            for n, m in linears.items()]
        for m in linears.values():
            m.quantization_enabled = False
        own, model.config._attn_implementation = model.config._attn_implementation, "eager"
        with torch.no_grad():  # llm-compressor's calibration_forward_context forces eager attention
            for w in calibration.tokens:
                model(input_ids=w[None])
        model.config._attn_implementation = own
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            m.quantization_enabled = True
            lo, hi = seen[n]
            if plain(act.strategy) == "tensor_group":
                m.input_global_scale.data = generate_gparam(lo, hi)
            else:
                scale, zp = calculate_qparams(lo, hi, act)
                m.input_scale.data, m.input_zero_point.data = scale.to(m.input_scale.dtype), zp.to(
                    m.input_zero_point.dtype)
    joint = fused_ranges(model, linears)
    for n, m in linears.items():  # the weight observer: min and max over each scale's unit
        wa, w = scheme.weights, m.weight.data
        lo, hi = joint.get(n, (w.min(), w.max()))  # a tensor group's global scale: its fused group's
        gs = generate_gparam(lo, hi) if plain(wa.strategy) == "tensor_group" else None
        if gs is not None:
            m.weight_global_scale.data = gs
        if plain(wa.strategy) == "tensor":
            lo, hi = w.min(), w.max()
        elif plain(wa.strategy) == "channel":
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            groups = w.unflatten(-1, (-1, wa.group_size))  # (O, I/g, g)
            lo, hi = groups.amin(-1), groups.amax(-1)
        scale, zp = calculate_qparams(lo, hi, wa, global_scale=gs)
        m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        m.weight_zero_point.data = zp.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    return model


def modelopt_block_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
    """ModelOpt's dynamic block fake quantization (``tensor_quant.dynamic_block_quantize_op``, CUDA kernels
    only) through its own pure-torch quantizers instead: ``MXFP4QTensor`` for E8M0 scales, ``NVFP4QTensor``
    under the quantizer's amax (its export's ``amax / (6 · 448)``) for E4M3 ones; quantize, then
    dequantize to the input's dtype."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    assert (num_bits, exponent_bits) == (4, 2), "E2M1 elements only"
    if scale_exponent_bits == 8:
        q, e8m0 = MXFP4QTensor.quantize(inputs, block_size)
        return q.dequantize(inputs.dtype, scale=e8m0, block_sizes={-1: block_size})
    q, scale, second = NVFP4QTensor.quantize(inputs, block_size,
                                             weights_scaling_factor_2=amax.float() / (6.0 * 448.0))
    return q.dequantize(inputs.dtype, scale=scale, double_scale=second, block_sizes={-1: block_size})


@contextlib.contextmanager
def modelopt_on_cpu():
    """ModelOpt with :func:`modelopt_block_op` in place of its CUDA-only block quantization."""
    from modelopt.torch.quantization import tensor_quant

    own, tensor_quant.dynamic_block_quantize_op = tensor_quant.dynamic_block_quantize_op, modelopt_block_op
    try:
        yield
    finally:
        tensor_quant.dynamic_block_quantize_op = own


def modelopt_model(model, name: str, calibration, config=None):
    """``model`` (a copy) quantized by ModelOpt's ``mtq.quantize`` with its config ``name`` (or
    ``config``), max-calibrated on the ``calibration`` windows; then, as its checkpoint export does
    (``requantize_resmooth_fused_llm_layers``), the linears that share an input given one weight and one
    input amax. Call it, and run the model, under :func:`modelopt_on_cpu` for FP4 block configs."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    model = copy.deepcopy(model)

    def loop(m):
        for w in calibration.tokens:
            m(input_ids=w[None])

    model = mtq.quantize(model, copy.deepcopy(config or getattr(mtq, name)), forward_loop=loop)
    if not model.config.architectures:  # the export's dummy forward reads it
        model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def window_nll(model, wins) -> list[float]:
    """Each window's mean next-token NLL, as kernelscope's evaluation computes it (float32 token NLLs
    summed in float64), one window a forward pass."""
    out = []
    with torch.no_grad():
        for w in wins.tokens:
            logits = model(input_ids=w[None], use_cache=False).logits
            nll = F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="none")
            out.append(float(nll.double().sum()) / (wins.seqlen - 1))
    return out
