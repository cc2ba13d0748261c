"""Deployment targets through the command line: named as the user types them, calibrated where they
have static scales, recorded in the run, refused with one line where they cannot be computed."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.test_cli import run_cli
from tests.test_trust import assert_refused


def base(model, text) -> list[str]:
    return [str(model), "--dataset", str(text), "-n", "3", "--seqlen", "48"]


def test_eval_names_targets_case_insensitively_and_records_their_arithmetic(capsys, tmp_path, tiny_llama_dir,
                                                                           text_file):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "eval", *base(tiny_llama_dir, text_file), "--scheme",
                                   "fp,LLM-Compressor:fp8_dynamic,llm-compressor:FP8,w8a8-per-token",
                                   "--calib-dataset", str(text_file), "--calib-nsamples", "2", "-o", str(out))
    assert code == 0, stderr
    table = pl.read_parquet(out / "eval.parquet")
    assert table["scheme"].to_list() == ["fp", "llm-compressor:FP8_DYNAMIC", "llm-compressor:FP8",
                                         "w8a8-per-token"]
    assert table["arithmetic"].to_list() == ["kernelscope", "compressed-tensors 0.20.1",
                                             "compressed-tensors 0.20.1", "kernelscope"]
    assert table["activation_format"][1] == "float8 token dynamic"
    summary = json.loads((out / "summary.json").read_text())
    scales = summary["static_scales"]["llm-compressor:FP8, none"]["layers"]
    assert set(scales) == {n for n in scales if ".layers." in n} and len(scales) == 14
    assert all(s["scale"] > 0 for s in scales.values())
    assert summary["calibration"]["windows"]["windows"] == 2
    assert "compressed-tensors 0.20.1" in " ".join(stdout.split())


def test_a_dynamic_target_needs_no_calibration_and_refuses_its_options(capsys, tmp_path, tiny_llama_dir,
                                                                        text_file):
    assert_refused(capsys, ["eval", *base(tiny_llama_dir, text_file), "--scheme", "llm-compressor:W8A8",
                            "--calib-nsamples", "4"], "--calib-nsamples", tmp_path)


@pytest.mark.parametrize(("scheme", "message"), [
    ("llm-compressor:W4A16", "groups of 128 inputs"),
    ("llm-compressor:w4a16_asym", "asymmetric zero point"),
    ("llm-compressor:W9A9", "unknown llm-compressor scheme 'llm-compressor:W9A9'"),
    ("vllm:W8A8", "unknown library 'vllm'"),
    ("modelopt:@cfg.json", "no ModelOpt config file 'cfg.json'"),
    ("vllm:@cfg.yaml", "a file is read for llm-compressor and modelopt only"),
    ("llm-compressor:@missing.yaml", "no recipe file 'missing.yaml'"),
])
def test_targets_that_cannot_be_computed_are_one_line(capsys, tmp_path, tiny_llama_dir, text_file, scheme,
                                                      message):
    assert_refused(capsys, ["eval", *base(tiny_llama_dir, text_file), "--scheme", f"fp,{scheme}"], message,
                   tmp_path)


def test_a_recipe_takes_no_transform(capsys, tmp_path, tiny_llama_dir, text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("QuantizationModifier: {scheme: W8A8, targets: [Linear], ignore: [lm_head]}\n")
    assert_refused(capsys, ["eval", *base(tiny_llama_dir, text_file), "--scheme", f"llm-compressor:@{recipe}",
                            "--transform", "hadamard"], "give it without --transform", tmp_path)


def test_advise_plans_with_the_target_s_arithmetic(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "plan"
    code, _, stderr = run_cli(capsys, "advise", str(tiny_llama_dir), "--dataset", str(text_file), "-n", "8",
                              "--seqlen", "48", "--scheme", "llm-compressor:FP8", "--calib-dataset",
                              str(text_file), "--calib-nsamples", "2", "-o", str(out))
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheme"]["scheme"] == "llm-compressor:FP8"
    assert summary["scheme"]["arithmetic"] == "compressed-tensors 0.20.1"
    assert summary["static_scales"]["observer"] == "static_minmax"
    assert summary["kernel"]["scheme"] == "remove-kernel of llm-compressor:FP8"


def test_advise_refuses_a_weight_only_target(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["advise", str(tiny_llama_dir), "--dataset", str(text_file), "-n", "8", "--seqlen",
                            "48", "--scheme", "llm-compressor:NVFP4A16"], "quantizes no activation", tmp_path)


def test_targets_lists_every_target_and_every_refusal(capsys):
    from kernelscope.quant import targets as T

    code, stdout, _ = run_cli(capsys, "targets", "--json")
    assert code == 0
    rows = json.loads(stdout)
    assert {r["scheme"].lower() for r in rows if r["refused"] is None} == set(T.TARGETS)
    assert {r["scheme"] for r in rows if r["refused"]} == set(T.UNSUPPORTED)
    code, stdout, _ = run_cli(capsys, "targets")
    assert code == 0 and f"{len(T.TARGETS)} deployment targets" in stdout
    assert "modelopt:w4a8_awq_beta_cfg is refused: it runs AWQ's search" in " ".join(stdout.split())
    assert [r["scheme"] for r in rows if r["smoothquant_alpha"] == 1.0] == ["modelopt:INT8_SMOOTHQUANT_CFG"]
