"""``threshold --family LIBRARY:NAME``: the kernels K_λ = {|x / s| <= λ·τ} with ``x / s`` as the target's
library computes it, checked against compressed-tensors' and ModelOpt's own scale functions, and the
search run on them end to end."""

from __future__ import annotations

import json

import pytest
import torch

from kernelscope.errors import KernelscopeError
from kernelscope.models import select_linear_layers
from kernelscope.quant import targets as T
from kernelscope.quant.modes import Mode
from kernelscope.runs.evaluate import run_scheme
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.threshold import threshold_search
from tests.oracles import window_nll
from tests.test_cli import run_cli
from tests.test_targets import adversarial
from tests.test_targets_cli import base
from tests.test_targets_models import wide_llama, windows
from tests.test_trust import assert_refused

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import calculate_qparams

LAMBDAS = (0.25, 1.0, 3.0, 40.0)


def ct_quotient(x: torch.Tensor) -> torch.Tensor:
    """``x / s`` per token, ``s`` from compressed-tensors' own ``calculate_qparams`` (W8A8's inputs)."""
    args = PRESET_SCHEMES["W8A8"]["input_activations"]
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale, _ = calculate_qparams(lo, hi, args)
    return (x / scale.to(x.dtype)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_kernel_at_lambda_is_the_library_quotient_against_lambda_tau(dtype):
    args = T.get_target("llm-compressor:W8A8").input_activations
    x = adversarial((2, 9, 128), dtype, 11)
    q = ct_quotient(x)
    for lam in LAMBDAS:
        _, mask = T.quantize_activation(x, args, None, kernel_scale=lam)
        assert torch.equal(mask, q.abs() <= lam * 0.5), lam
    out, at_one = T.quantize_activation(x, args, None)
    assert out.dtype == dtype and torch.equal(at_one, out == 0)  # at 1: exactly what rounds to zero


def test_modelopt_s_kernel_at_lambda_is_its_multiplier_quotient():
    args = T.get_target("modelopt:INT8_DEFAULT_CFG").input_activations
    x = adversarial((3, 7, 96), torch.float32, 12)
    amax = torch.tensor(1.5)
    for lam in LAMBDAS:
        _, mask = T.quantize_activation(x, args, T.Calibration(amax), kernel_scale=lam)
        assert torch.equal(mask, (x * (127.0 / amax)).abs() <= lam * 0.5), lam


def test_removing_a_target_s_kernel_at_lambda_gives_the_hand_made_model():
    """Every window's NLL under ``remove-kernel λ`` of llm-compressor:W8A8 equals that of the model whose
    Linear inputs lose, by hooks written here, the elements with |x / s| <= λ/2 (s from
    compressed-tensors)."""
    model = wide_llama(torch.float32)
    wins = windows(21, n=2)
    layers = select_linear_layers(model, "")
    target = T.get_target("llm-compressor:W8A8")
    for lam in (1.0, 6.0):
        scheme = Scheme("r", Mode.REMOVE_KERNEL, target=target, kernel_scale=lam)
        ours = run_scheme(model, wins, scheme, layers)["window_nll"]

        def drop(module, args, lam=lam):
            x = args[0]
            return (torch.where(ct_quotient(x).abs() <= lam * 0.5, torch.zeros((), dtype=x.dtype), x),)

        handles = [layer.module.register_forward_pre_hook(drop) for layer in layers]
        try:
            theirs = window_nll(model, wins)
        finally:
            for h in handles:
                h.remove()
        assert ours == theirs, lam
    assert ours != window_nll(model, wins)


def test_a_search_along_a_target_s_kernels_judges_its_own_kernel():
    model = wide_llama(torch.float32)
    scheme = parse_scheme("llm-compressor:FP8")
    result = threshold_search(model, windows(22, n=2), family=scheme, tolerance=0.01, steps=1,
                              calibration=windows(23, n=2))
    s = result.summary
    assert s["family"]["label"] == "llm-compressor:FP8" and s["family"]["format"] == "e4m3"
    assert s["static_scales"]["observer"] == "static_minmax"
    search = s["searches"][0]
    own = [r for r in search["actual_kernels"] if r["config"] == "llm-compressor:FP8"]
    assert len(own) == 1
    one = next(p for p in search["curve"] if p["lambda"] == 1.0)
    assert own[0]["kernel_fraction"] == one["kernel_fraction"]
    assert any(v.startswith("llm-compressor:FP8 kernel") for v in search["verdicts"])
    assert all("not judged" in v for v in search["verdicts"] if not v.startswith("llm-compressor:FP8"))


def test_a_search_refuses_what_a_target_family_cannot_be():
    model = wide_llama(torch.float32)
    with pytest.raises(KernelscopeError, match="leaves activations in full precision"):
        threshold_search(model, windows(24, n=2), family=parse_scheme("llm-compressor:W4A16"))
    with pytest.raises(KernelscopeError, match="calibration windows"):
        threshold_search(model, windows(24, n=2), family=parse_scheme("llm-compressor:FP8"), steps=0)


def test_threshold_takes_a_target_family_on_the_command_line(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    code, _, stderr = run_cli(capsys, "threshold", *base(tiny_llama_dir, text_file), "--family",
                              "ModelOpt:int8_default_cfg", "--steps", "1", "--calib-dataset", str(text_file),
                              "--calib-nsamples", "2", "-o", str(out))
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"]["label"] == "modelopt:INT8_DEFAULT_CFG"
    assert summary["family"]["arithmetic"] == "nvidia-modelopt 0.47.0"


@pytest.mark.parametrize(("extra", "message"), [
    (["--family", "llm-compressor:W8A8", "--transform", "hadamard"], "deploys in the model's own basis"),
    (["--family", "llm-compressor:W8A8", "--weight-bits", "8"], "removes the target's activation kernel"),
    (["--family", "llm-compressor:W8A8", "--family-bits", "4"], "carries its own 8-bit elements"),
    (["--family", "llm-compressor:NVFP4A16"], "leaves activations in full precision"),
])
def test_threshold_refuses_what_a_target_family_does_not_take(capsys, tmp_path, tiny_llama_dir, text_file,
                                                              extra, message):
    assert_refused(capsys, ["threshold", *base(tiny_llama_dir, text_file), *extra], message, tmp_path)
