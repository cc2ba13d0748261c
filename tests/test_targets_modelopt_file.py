"""A user's own ModelOpt config (``--scheme modelopt:@FILE``) against ModelOpt itself: the file, applied by
``mtq.quantize`` as written, gives the model whose perplexity kernelscope measures, window by window, to
the bit; and every config kernelscope cannot compute exactly is refused with its reason."""

from __future__ import annotations

import copy
import json
import re

import polars as pl
import pytest
import torch
import yaml

from kernelscope.errors import KernelscopeError
from kernelscope.quant import quant_cfg as Q
from kernelscope.quant import targets as T
from kernelscope.runs.evaluate import evaluate
from kernelscope.runs.fakequant import covered_layers
from kernelscope.runs.schemes import parse_scheme
from tests.conftest import tiny_model
from tests.oracles import modelopt_model, modelopt_on_cpu, window_nll
from tests.test_cli import run_cli
from tests.test_exports import modelopt_file
from tests.test_targets import adversarial, same_bits
from tests.test_targets_cli import base
from tests.test_targets_models import wide_llama, windows
from tests.test_trust import assert_refused

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization import tensor_quant  # noqa: E402

PRESETS = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "NVFP4_DEFAULT_CFG",
           "MXFP4_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"]


def plain(value):
    """A config as a YAML file holds it (tuples as lists)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def preset(name: str) -> dict:
    return plain(copy.deepcopy(dict(getattr(mtq, name))))


def write(tmp_path, body, name="cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(body) if name.endswith(".json") else yaml.safe_dump(body))
    return str(path)


def mtq_nll(model, body, calib, wins) -> list[float]:
    """Each window's NLL of the model ``mtq.quantize`` makes of ``body`` (FP4 blocks through ModelOpt's
    pure-torch quantizers, fused layers as its export gives them)."""
    with modelopt_on_cpu():
        return window_nll(modelopt_model(model, None, calib, config=body), wins)


@pytest.mark.parametrize("name", PRESETS)
def test_modelopt_s_own_presets_as_files_are_its_named_targets(name, tmp_path):
    target = parse_scheme(f"modelopt:@{write(tmp_path, preset(name))}").target
    named = T.get_target(f"modelopt:{name}")
    assert (target.weights, target.input_activations, target.smoothquant_alpha) == (
        named.weights, named.input_activations, named.smoothquant_alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_file_s_perplexity_is_the_mtq_model_s(name, dtype, tmp_path):
    model = wide_llama(dtype)
    wins, calib = windows(1), windows(2, n=2)
    body = preset(name)
    scheme = parse_scheme(f"modelopt:@{write(tmp_path, body)}")
    ours = evaluate(model, wins, [scheme], calibration=calib).table.row(0, named=True)["window_nll"]
    assert ours == mtq_nll(model, body, calib, wins)
    assert ours != window_nll(model, wins)


@pytest.mark.parametrize("scheme", ["w8a8-per-token", "fp8"])
def test_kernelscope_s_own_exported_file_reads_back_as_what_modelopt_deploys(scheme, tmp_path):
    """The file advise writes for a kernelscope scheme (narrow INT range, per-token inputs, each layer
    named), read as a target: the layers it names, and mtq.quantize's model to the bit."""
    model = wide_llama(torch.float32)
    text, quantized, _ = modelopt_file(scheme, model)
    path = tmp_path / "modelopt_quant_cfg.yaml"
    path.write_text(text)
    parsed = parse_scheme(f"modelopt:@{path}")
    assert sorted(layer.name for layer in covered_layers(model, parsed, [])) == sorted(quantized)
    wins, calib = windows(3), windows(4, n=2)
    ours = evaluate(model, wins, [parsed], calibration=calib).table.row(0, named=True)["window_nll"]
    assert ours == mtq_nll(model, yaml.safe_load(text), calib, wins)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_narrow_int_range_is_modelopt_s_element_for_element(dtype):
    args = T.Args(8, T.Kind.INT, T.Strategy.TENSOR, arithmetic=T.Arithmetic.MODELOPT, narrow_range=True)
    x = adversarial((32, 96), dtype, 5)
    amax = torch.tensor(2.0)  # a static scale below the data's abs-max: both ends reach the clamp
    mine, zero = T.fake_quantize(x, amax, args)
    theirs = tensor_quant._tensor_quant(x, amax, num_bits=8, unsigned=False, narrow_range=True)
    assert same_bits(mine, theirs) and torch.equal(zero, theirs == 0)
    finite = mine[torch.isfinite(x)]
    assert finite.min() == -2.0 and finite.max() == 2.0  # ±127 steps: -128 is never reached


def test_the_older_mapping_form_means_the_same_entries():
    listed = Q.entries(preset("INT8_DEFAULT_CFG")["quant_cfg"])
    legacy = {"default": {"enable": False}, "*weight_quantizer": {"num_bits": 8, "axis": 0},
              "*input_quantizer": {"num_bits": 8, "axis": None},
              "nn.Embedding": {"*": {"enable": False}}}
    older = Q.entries(legacy)
    assert older[:3] == listed[:3]
    assert older[3] == Q.Entry("*", "nn.Embedding", None, False)


def test_an_entry_reaches_the_quantizers_its_glob_can_name():
    reach = {p: {r for r in (Q.WEIGHT, Q.INPUT, Q.OUTPUT) if Q.Entry(p, None, None, True).reaches(r)}
             for p in ("*weight_quantizer", "*", "*_quantizer", "a.b.input_quantizer", "*lm_head*",
                       "*down_proj.weight_quantizer", "a.b.*", "*[wo]*_quantizer", "input_quantizer")}
    assert reach == {"*weight_quantizer": {Q.WEIGHT}, "*": {Q.WEIGHT, Q.INPUT, Q.OUTPUT},
                     "*_quantizer": {Q.WEIGHT, Q.INPUT, Q.OUTPUT}, "a.b.input_quantizer": {Q.INPUT},
                     "*lm_head*": {Q.WEIGHT, Q.INPUT, Q.OUTPUT}, "*down_proj.weight_quantizer": {Q.WEIGHT},
                     "a.b.*": {Q.WEIGHT, Q.INPUT, Q.OUTPUT},
                     "*[wo]*_quantizer": {Q.WEIGHT, Q.INPUT, Q.OUTPUT}, "input_quantizer": {Q.INPUT}}


def _with(name: str, index: int, entry: dict | None = None, **top) -> dict:
    """A preset with entry ``index`` replaced by ``entry`` (None: removed) and top-level keys set."""
    body = preset(name)
    if entry is None:
        del body["quant_cfg"][index]
    else:
        body["quant_cfg"][index] = entry
    return body | top


NVFP4_32 = {"quantizer_name": "*weight_quantizer",
            "cfg": {"num_bits": [2, 1], "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": [4, 3]}}}
MXFP4_STATIC = {"quantizer_name": "*weight_quantizer",
                "cfg": {"num_bits": [2, 1], "block_sizes": {-1: 32, "type": "static", "scale_bits": [8, 0]}}}
REFUSED = {
    "no leading off": (_with("INT8_DEFAULT_CFG", 0), "does not begin by turning every quantizer off"),
    "smoothquant": (preset("INT8_DEFAULT_CFG") | {"algorithm": {"method": "smoothquant", "alpha": 0.5}},
                    "smoothquant alpha 0.5 is not modelled"),
    "fp8 smoothquant": (preset("FP8_DEFAULT_CFG") | {"algorithm": "smoothquant"},
                        "smoothquant with quantizers other than 8-bit INT"),
    "awq settings": (preset("INT8_DEFAULT_CFG") | {"algorithm": {"method": "max", "alpha": 1.0}},
                     "algorithm settings"),
    "awq": (preset("INT8_DEFAULT_CFG") | {"algorithm": {"method": "awq_lite"}}, "algorithm 'awq_lite'"),
    "nvfp4": (_with("INT8_DEFAULT_CFG", 1, NVFP4_32), "E2M1 blocks as NVFP4"),
    "static mx": (_with("INT8_DEFAULT_CFG", 1, MXFP4_STATIC), "E2M1 blocks as NVFP4"),
    "fp4 per tensor": (_with("INT8_DEFAULT_CFG", 1, {"quantizer_name": "*weight_quantizer",
                                                     "cfg": {"num_bits": [2, 1]}}), "E2M1 elements in"),
    "unknown key": (preset("FP8_DEFAULT_CFG") | {"note": "x"}, "unknown key 'note'"),
    "output on": (_with("FP8_DEFAULT_CFG", 1, {"quantizer_name": "*output_quantizer",
                                               "cfg": {"num_bits": 8}}),
                  "reaches output or attention quantizers"),
    "all on": (_with("FP8_DEFAULT_CFG", 1, {"quantizer_name": "*", "enable": True}),
               "reaches output or attention quantizers"),
    "bmm on": (_with("FP8_DEFAULT_CFG", 1, {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8}}),
               "reaches output or attention quantizers"),
    "per-channel input": (_with("INT8_DEFAULT_CFG", 2, {"quantizer_name": "*input_quantizer",
                                                        "cfg": {"num_bits": 8, "axis": -1}}),
                          "axis -1 with type static is not modelled for input_quantizers"),
    "unsigned": (_with("INT8_DEFAULT_CFG", 1, {"quantizer_name": "*weight_quantizer",
                                               "cfg": {"num_bits": 8, "axis": 0, "unsigned": True}}),
                 "unsigned: True is not modelled"),
    "sequential": (_with("INT8_DEFAULT_CFG", 1, {"quantizer_name": "*weight_quantizer",
                                                 "cfg": [{"num_bits": 4}, {"num_bits": [4, 3]}]}),
                   "sequential quantization"),
    "two weight configs": (_with("INT8_DEFAULT_CFG", 3, {"quantizer_name": "*down_proj.weight_quantizer",
                                                         "cfg": {"num_bits": 4, "axis": 0}}),
                           "2 configurations"),
    "uncalibrated": (preset("INT8_DEFAULT_CFG") | {"algorithm": None}, "uncalibrated"),
    "uncalibrated nvfp4": (preset("NVFP4_DEFAULT_CFG") | {"algorithm": None}, "NVFP4 input amax"),
    "nvfp4 beside fp8": (_with("FP8_DEFAULT_CFG", 1, preset("NVFP4_DEFAULT_CFG")["quant_cfg"][1]),
                         "W4A8_NVFP4_FP8"),
    "imports": ({"imports": {"fp8": "configs/numerics/fp8"}, "quant_cfg": []}, "$import"),
    "per-row blocks as JSON keys": (_with("FP8_PER_CHANNEL_PER_TOKEN_CFG", 2, {
        "quantizer_name": "*input_quantizer",
        "cfg": {"num_bits": [4, 3], "type": "dynamic", "block_sizes": {"-1": None}}}), "per-row scales"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_is_not_computed_exactly_is_refused_with_the_reason(case, tmp_path):
    body, message = REFUSED[case]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("$", r"\$")) as caught:
        parse_scheme(f"modelopt:@{write(tmp_path, body)}")
    assert "\n" not in str(caught.value)


def test_modelopt_itself_takes_the_refused_algorithms_and_blocks():
    """The refusals are of configs ModelOpt accepts (not of malformed files)."""
    from modelopt.torch.quantization.config import QuantizeConfig

    for case in ("smoothquant", "nvfp4", "sequential", "two weight configs"):
        QuantizeConfig.model_validate(REFUSED[case][0])


def test_a_layer_quantized_otherwise_and_an_embedding_are_refused_on_the_model(tmp_path):
    model = tiny_model("llama")
    weight_only = _with("INT8_DEFAULT_CFG", 3, {"quantizer_name": "*layers.0.mlp.down_proj.input_quantizer",
                                                "enable": False})
    with pytest.raises(KernelscopeError, match=r"quantizes model\.layers\.0\.mlp\.down_proj's "
                                               "input_quantizer otherwise than the other layers'"):
        covered_layers(model, parse_scheme(f"modelopt:@{write(tmp_path, weight_only)}"), [])
    body = preset("INT8_DEFAULT_CFG")
    body["quant_cfg"] = [e for e in body["quant_cfg"] if e.get("parent_class") != "nn.Embedding"]
    with pytest.raises(KernelscopeError, match=r"quantizes model.embed_tokens \(Embedding\), which is not a "
                                               "Linear layer"):
        covered_layers(model, parse_scheme(f"modelopt:@{write(tmp_path, body, 'e.yaml')}"), [])


def test_a_json_config_without_blocks_reads_as_its_yaml(tmp_path):
    body = preset("FP8_DEFAULT_CFG")
    assert (parse_scheme(f"modelopt:@{write(tmp_path, body, 'c.json')}").target.input_activations
            == parse_scheme(f"modelopt:@{write(tmp_path, body)}").target.input_activations)


def test_eval_takes_a_modelopt_file_and_refuses_a_bad_one_in_one_line(capsys, tmp_path, tiny_llama_dir,
                                                                       text_file):
    good = write(tmp_path, preset("FP8_DEFAULT_CFG"), "good.yaml")
    code, _, stderr = run_cli(capsys, "eval", *base(tiny_llama_dir, text_file), "--scheme",
                              f"fp,modelopt:@{good}", "--calib-dataset", str(text_file),
                              "--calib-nsamples", "2", "-o", str(tmp_path / "run"))
    assert code == 0, stderr
    table = pl.read_parquet(tmp_path / "run" / "eval.parquet")
    assert table["scheme"].to_list() == ["fp", f"modelopt:@{good}"]
    assert table["arithmetic"][1] == T.MODELOPT_CHECKED
    scales = json.loads((tmp_path / "run" / "summary.json").read_text())["static_scales"]
    assert len(scales[f"modelopt:@{good}, none"]["layers"]) == 14  # every decoder Linear, not lm_head
    bad = write(tmp_path, preset("INT8_DEFAULT_CFG") | {"algorithm": "awq_full"}, "bad.yaml")
    assert_refused(capsys, ["eval", *base(tiny_llama_dir, text_file), "--scheme", f"modelopt:@{bad}"],
                   "algorithm 'awq_full'", tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_a_modelopt_preset_on_a_model_with_layernorm_is_refused_as_modelopt_quantizes_its_inputs(family):
    """ModelOpt's presets turn on every ``*input_quantizer``, LayerNorm's included (checked here on the
    mtq-quantized model itself), which kernelscope does not model."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    model = tiny_model(family)
    quantized = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.INT8_DEFAULT_CFG),
                             forward_loop=lambda m: m(input_ids=torch.arange(1, 9)[None]))
    modules = dict(model.named_modules())
    norms = [n.rsplit(".", 1)[0] for n, m in quantized.named_modules()
             if isinstance(m, TensorQuantizer) and m.is_enabled
             and isinstance(modules.get(n.rsplit(".", 1)[0]), torch.nn.LayerNorm)]
    assert norms
    first = next(n for n in modules if n in norms)
    for name in PRESETS:
        with pytest.raises(KernelscopeError, match=rf"quantizes {re.escape(first)} \(LayerNorm\)"):
            covered_layers(model, parse_scheme(f"modelopt:{name}"), [])
    assert covered_layers(tiny_model("llama"), parse_scheme("modelopt:INT8_DEFAULT_CFG"), ["x"]) == ["x"]


def test_a_fused_group_quantized_in_part_shares_its_nvfp4_amax_among_the_quantized_as_modelopt_s_export(
        tmp_path):
    """ModelOpt's export gives the quantized linears that share an input one amax, whichever they are:
    with v_proj of one block left off, that block's q_proj and k_proj share theirs."""
    model = wide_llama(torch.float32)
    wins, calib = windows(5), windows(6, n=2)
    body = preset("NVFP4_DEFAULT_CFG")
    off = "model.layers.0.self_attn.v_proj"
    body["quant_cfg"].append({"quantizer_name": f"{off}.*", "enable": False})
    scheme = parse_scheme(f"modelopt:@{write(tmp_path, body)}")
    assert off not in {layer.name for layer in covered_layers(model, scheme, [])}
    ours = evaluate(model, wins, [scheme], calibration=calib).table.row(0, named=True)["window_nll"]
    assert ours == mtq_nll(model, body, calib, wins)
    named = evaluate(model, wins, [parse_scheme("modelopt:NVFP4_DEFAULT_CFG")], calibration=calib,
                     ignore=[off]).table.row(0, named=True)["window_nll"]
    assert named == ours
    q, k = (model.get_submodule(f"model.layers.0.self_attn.{n}").weight for n in ("q_proj", "k_proj"))
    assert q.abs().max() != k.abs().max()  # so sharing the amax changes one of them


def test_llm_compressor_s_nvfp4_on_part_of_a_fused_group_is_refused():
    """llm-compressor 0.14 asserts when a fused group's NVFP4 weights are quantized only in part."""
    model = wide_llama(torch.float32)
    for name in ("llm-compressor:NVFP4", "llm-compressor:NVFP4A16"):
        with pytest.raises(KernelscopeError, match=r"model\.layers\.1\.mlp\.gate_proj, model\.layers\.1\."
                                                   r"mlp\.up_proj one NVFP4 weight scale.*--ignore the whole "
                                                   "group"):
            evaluate(model, windows(5), [parse_scheme(name)], calibration=windows(6, n=2),
                     ignore=["model.layers.1.mlp.up_proj"])
    evaluate(model, windows(5), [parse_scheme("llm-compressor:NVFP4A16")],
             ignore=["model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"])


def test_smoothquant_on_part_of_a_fused_group_is_refused(tmp_path):
    """ModelOpt's export averages the smoothing of the quantized members of a group only; a config that
    leaves one out is refused, and the same group left whole by --ignore is not."""
    body = preset("INT8_SMOOTHQUANT_CFG")
    body["quant_cfg"].append({"quantizer_name": "model.layers.0.self_attn.v_proj.*", "enable": False})
    model, wins, calib = wide_llama(torch.float32), windows(5), windows(6, n=2)
    with pytest.raises(KernelscopeError, match=r"quantizes only part of model\.layers\.0\.self_attn\.q_proj"):
        evaluate(model, wins, [parse_scheme(f"modelopt:@{write(tmp_path, body)}")], calibration=calib)
    ignored = evaluate(model, wins, [parse_scheme("modelopt:INT8_SMOOTHQUANT_CFG")], calibration=calib,
                       ignore=["model.layers.0.self_attn.v_proj"]).table.row(0, named=True)["window_nll"]
    without = preset("INT8_SMOOTHQUANT_CFG")
    without["quant_cfg"].append({"quantizer_name": "model.layers.0.self_attn.v_proj.*", "enable": False})
    assert ignored == mtq_nll(model, without, calib, wins)  # the export merges q and k only; so does --ignore
