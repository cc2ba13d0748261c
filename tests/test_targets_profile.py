"""``profile -q LIBRARY:NAME``: each layer's activation kernel as the deploying library computes it, counted
in the profile's own passes and equal to the zeros the library's own quantizer gives on the same inputs."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

import kernelscope as ks
from kernelscope.errors import KernelscopeError
from kernelscope.runs.schemes import parse_scheme
from tests.conftest import tiny_model
from tests.test_cli import run_cli
from tests.test_targets import Holder
from tests.test_targets_cli import base
from tests.test_trust import assert_refused

ct = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402

WINDOWS = ks.make_windows(torch.arange(900) % 500, 48, 4)
CALIBRATION = ks.make_windows((torch.arange(900) * 7 + 3) % 500, 48, 3)


def inputs(model, windows) -> dict[str, list[torch.Tensor]]:
    """Every decoder Linear's input on each window, as the module receives it (hooks of the test's own)."""
    seen: dict[str, list[torch.Tensor]] = {}
    def keep(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0].clone())

    handles = [m.register_forward_pre_hook(keep(n))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    try:
        with torch.no_grad():
            for w in windows.tokens:
                model(input_ids=w[None])
    finally:
        for h in handles:
            h.remove()
    return seen


def kernels(result, config: str) -> dict[str, int]:
    rows = result.layers.filter(pl.col("config") == config)
    return dict(zip(rows["layer"].to_list(), rows["kernel_elements"].to_list(), strict=True))


def test_a_dynamic_target_s_kernel_is_the_zeros_of_compressed_tensors_own_quantizer():
    model = tiny_model("llama")
    result = ks.profile(model, WINDOWS, [], targets=[parse_scheme("llm-compressor:W8A8")])
    args = PRESET_SCHEMES["W8A8"]["input_activations"]
    expected = {name: sum(int((ct.forward_quantize(Holder(), x, "input", args) == 0).sum()) for x in xs)
                for name, xs in inputs(model, WINDOWS).items()}
    assert kernels(result, "llm-compressor:W8A8") == expected
    assert set(result.layers["config"]) == {"llm-compressor:W8A8"}
    row = result.layers.row(0, named=True)
    assert row["bound_p50"] is None and row["format"] == "int8" and row["bits"] == 8
    assert row["kernel_fraction"] == row["kernel_elements"] / row["elements"]


def test_a_static_target_s_kernel_is_modelopt_s_with_its_max_calibration():
    from modelopt.torch.quantization import tensor_quant

    model = tiny_model("llama")
    scheme = parse_scheme("modelopt:INT8_DEFAULT_CFG")
    result = ks.profile(model, WINDOWS, ks.expand_configs(["per_token"], [8], [], None), targets=[scheme],
                        calibration=CALIBRATION)
    calibrating = inputs(model, CALIBRATION)
    expected = {}
    for name, xs in inputs(model, WINDOWS).items():
        amax = torch.stack([x.abs().amax() for x in calibrating[name]]).amax()  # max calibration
        expected[name] = sum(int((tensor_quant._tensor_quant(x, amax, num_bits=8) == 0).sum()) for x in xs)
    assert kernels(result, scheme.name) == expected
    assert kernels(result, scheme.name) != kernels(result, "per_token int8")
    scales = result.summary["static_scales"][scheme.name]["layers"]
    assert scales["model.layers.0.mlp.down_proj"]["amax"] == pytest.approx(
        float(torch.stack([x.abs().amax() for x in calibrating["model.layers.0.mlp.down_proj"]]).amax()))
    assert result.summary["deployment_targets"][scheme.name]["checked"] == "nvidia-modelopt 0.47.0"


def test_an_interrupted_profile_with_a_target_resumes_to_the_same_counts(tmp_path):
    model = tiny_model("llama")
    schemes = [parse_scheme("llm-compressor:FP8")]
    full = ks.profile(model, WINDOWS, [], targets=schemes, calibration=CALIBRATION)
    checkpoint = tmp_path / "run.checkpoint"

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ks.profile(model, WINDOWS, [], targets=schemes, calibration=CALIBRATION, checkpoint=checkpoint,
                   progress=stop)
    resumed = ks.profile(model, WINDOWS, [], targets=schemes, calibration=CALIBRATION, checkpoint=checkpoint,
                         resume=True)
    assert kernels(resumed, schemes[0].name) == kernels(full, schemes[0].name)
    assert sum(kernels(full, schemes[0].name).values()) > 0


def test_what_a_profile_cannot_count_for_a_target_is_refused():
    model = tiny_model("llama")
    with pytest.raises(KernelscopeError, match="calibration windows"):
        ks.profile(model, WINDOWS, [], targets=[parse_scheme("llm-compressor:FP8")])
    with pytest.raises(KernelscopeError, match="leaves activations in full precision"):
        ks.profile(model, WINDOWS, [], targets=[parse_scheme("llm-compressor:W4A16")])


def test_profile_takes_targets_beside_formats_on_the_command_line(capsys, tmp_path, tiny_llama_dir,
                                                                   text_file):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "profile", *base(tiny_llama_dir, text_file), "-q",
                                   "per_token,LLM-Compressor:w8a8,modelopt:FP8_DEFAULT_CFG", "-b", "8",
                                   "--calib-dataset", str(text_file), "--calib-nsamples", "2", "-o", str(out))
    assert code == 0, stderr
    layers = pl.read_parquet(out / "layers.parquet")
    assert layers["config"].unique(maintain_order=True).to_list() == [
        "per_token int8", "llm-compressor:W8A8", "modelopt:FP8_DEFAULT_CFG"]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["static_scales"]) == ["modelopt:FP8_DEFAULT_CFG"]
    assert "modelopt:FP8_DEFAULT_CFG" in " ".join(stdout.split())


@pytest.mark.parametrize(("extra", "message"), [
    (["-q", "llm-compressor:W8A8", "--transform", "hadamard"], "deploys in the model's own basis"),
    (["-q", "llm-compressor:NVFP4A16"], "leaves activations in full precision"),
    (["-q", "llm-compressor:W8A8", "-b", "4"], "-b has no effect here"),
    (["-q", "llm-compressor:W8A8", "--calib-nsamples", "4"], "--calib-nsamples"),
])
def test_profile_refuses_a_target_where_it_cannot_count_it(capsys, tmp_path, tiny_llama_dir, text_file, extra,
                                                            message):
    assert_refused(capsys, ["profile", *base(tiny_llama_dir, text_file), *extra], message, tmp_path)


def test_sweep_points_a_target_to_profile(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["sweep", *base(tiny_llama_dir, text_file), "-q", "llm-compressor:W8A8"],
                   "kernelscope profile MODEL -q llm-compressor:W8A8", tmp_path)
