"""A deployment target's perplexity is the perplexity of the model the library itself produces: the same
tiny model quantized by compressed-tensors (its ``apply_quantization_config`` and quantized forward, the
scales set as llm-compressor's min-max observers compute them, written out here) gives the same NLL in
every window, to the last bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kernelscope.data import make_windows
from kernelscope.runs.evaluate import evaluate
from kernelscope.runs.schemes import parse_scheme

ct = pytest.importorskip("compressed_tensors.quantization")
from tests.oracles import library_model, window_nll  # noqa: E402

SEQLEN = 24


def wide_llama(dtype: torch.dtype, seed: int = 0):
    """A two-layer LLaMA wide enough (128, 256) for groups of 128, with spread-out weights."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def windows(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return make_windows(torch.randint(1, 512, (n * SEQLEN,), generator=g), SEQLEN, n)


@pytest.mark.parametrize(("name", "dtype"), [
    ("W8A8", torch.float32), ("W8A8", torch.bfloat16), ("FP8_DYNAMIC", torch.float32),
    ("FP8", torch.float32), ("W4A16", torch.float32), ("W4A8", torch.bfloat16), ("NVFP4", torch.float32),
    ("NVFP4A16", torch.bfloat16), ("MXFP4", torch.float32), ("MXFP8", torch.bfloat16),
], ids=str)
def test_target_perplexity_is_the_library_model_s(name, dtype):
    model = wide_llama(dtype)
    wins, calib = windows(1), windows(2, n=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = window_nll(library_model(model, name, calib), wins)
    row = evaluate(model, wins, [parse_scheme(f"llm-compressor:{name}")], calibration=calib).table.row(
        0, named=True)
    assert row["window_nll"] == theirs
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fp = window_nll(model, wins)
    assert row["window_nll"] != fp  # the quantization did something


def test_static_scales_are_calibrated_and_recorded():
    model = wide_llama(torch.float32)
    wins, calib = windows(1), windows(2, n=2)
    from kernelscope.errors import KernelscopeError

    with pytest.raises(KernelscopeError, match="needs calibration windows"):
        evaluate(model, wins, [parse_scheme("llm-compressor:FP8")])
    schemes = [parse_scheme("fp"), parse_scheme("llm-compressor:FP8")]
    result = evaluate(model, wins, schemes, calibration=calib)
    scales = result.summary["static_scales"]["llm-compressor:FP8, none"]
    assert scales["observer"] == "static_minmax"
    layer = scales["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["scale"] == pytest.approx(max(-layer["min"], layer["max"]) / 448, rel=1e-6)


RECIPE = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: {ignore}
      config_groups:
        group_0:
          targets: [{targets}]
          weights: {{num_bits: 4, type: int, strategy: group, group_size: 64, symmetric: true}}
          input_activations: {{num_bits: 8, type: float, strategy: token, dynamic: true}}
"""


@pytest.mark.parametrize(("targets", "ignore"), [
    ("Linear", "[]"),  # lm_head too, as the library would
    ("Linear", "[lm_head, 're:.*down_proj']"),
    ("'re:.*self_attn.*'", "[model.layers.1.self_attn.o_proj]"),
])
def test_a_user_recipe_is_what_the_library_deploys(tmp_path, targets, ignore):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(targets=targets, ignore=ignore), encoding="utf-8")
    group = yaml.safe_load(path.read_text())["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    config = group["config_groups"]["group_0"]
    scheme = ct.QuantizationScheme(
        targets=config["targets"], weights=ct.QuantizationArgs(**config["weights"]),
        input_activations=ct.QuantizationArgs(**config["input_activations"]))
    model = wide_llama(torch.float32)
    wins = windows(3)
    theirs = window_nll(library_model(model, "", None, scheme=scheme, ignore=group["ignore"]), wins)
    row = evaluate(model, wins, [parse_scheme(f"llm-compressor:@{path}")]).table.row(0, named=True)
    assert row["window_nll"] == theirs
    assert row["scheme"] == f"llm-compressor:@{path}"


def test_a_recipe_of_a_preset_is_the_preset(tmp_path):
    path = tmp_path / "w8a8.yaml"
    path.write_text("stage:\n  mods:\n    QuantizationModifier: {targets: Linear, scheme: W8A8, "
                    "ignore: [lm_head]}\n", encoding="utf-8")
    model, wins = wide_llama(torch.float32), windows(4)
    rows = evaluate(model, wins, [parse_scheme(f"llm-compressor:@{path}"),
                                  parse_scheme("llm-compressor:w8a8")]).table
    assert rows["window_nll"][0].to_list() == rows["window_nll"][1].to_list()


@pytest.mark.parametrize(("body", "message"), [
    ("s: {m: {GPTQModifier: {scheme: W4A16}}}", "uses GPTQModifier"),
    ("s: {m: {QuantizationModifier: {scheme: W4A16}, AWQModifier: {}}}", "uses AWQModifier"),
    ("QuantizationModifier: {scheme: W4A16_ASYM}", "asymmetric zero point"),
    ("QuantizationModifier: {scheme: W9A9}", "unknown llm-compressor scheme"),
    ("QuantizationModifier: {config_groups: {a: {weights: {num_bits: 4, symmetric: false}}}}", "asymmetric"),
    ("QuantizationModifier: {config_groups: {a: {weights: {num_bits: 4, actorder: group}}}}", "GPTQ"),
    ("QuantizationModifier: {config_groups: {a: {weights: {num_bits: 4, observer: mse}}}}", "not a min-max"),
    ("QuantizationModifier: {config_groups: {a: {weights: {num_bits: 8}}, b: {weights: {num_bits: 4}}}}",
     "exactly one group"),
    ("QuantizationModifier: {config_groups: {a: {output_activations: {num_bits: 8}}}}", "output activations"),
    ("QuantizationModifier: {scheme: FP8, kv_cache_scheme: {num_bits: 8}}", "KV cache"),
    ("QuantizationModifier: {config_groups: {a: {input_activations: {num_bits: 8, strategy: channel}}}}",
     "static channel activation scales"),
    ("QuantizationModifier: {config_groups: {a: {input_activations: {num_bits: 8, type: float}}}}",
     "observer is not named"),
    ("QuantizationModifier: {config_groups: {a: {input_activations: {num_bits: 8, observer: minmax}}}}",
     "moving average"),
    (("QuantizationModifier: {config_groups: {a: {input_activations: {num_bits: 8, observer: "
      "memoryless_minmax}}}}"), "last calibration batch"),
    ("QuantizationModifier: {scheme: W8A8, targets: [Embedding]}", "not a Linear layer"),
    ("QuantizationModifier: {scheme: W8A8, targets: [Conv2d]}", "matches none"),
    ("[unclosed", "not a readable YAML recipe"),
])
def test_recipes_beyond_round_to_nearest_are_refused(tmp_path, body, message):
    from kernelscope.errors import KernelscopeError

    path = tmp_path / "r.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(KernelscopeError, match=message):
        evaluate(wide_llama(torch.float32), windows(5, n=1), [parse_scheme(f"llm-compressor:@{path}")])


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the zeroshot extra")
@pytest.mark.parametrize("name", ["FP8_DYNAMIC", "FP8"])
def test_zeroshot_of_a_target_is_the_harness_on_the_library_model(name, tokenizer, zeroshot_tasks,
                                                                  monkeypatch):
    """Every log-likelihood the harness gives the compressed-tensors model, to the last bit."""
    import lm_eval.evaluator

    from kernelscope.data.tasks import load_tasks
    from kernelscope.runs.zeroshot import zeroshot
    from tests.conftest import tiny_model
    from tests.test_zeroshot import TASKS, assert_same_as_harness, harness_direct

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # as quick_harness does
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    model, calib = tiny_model("llama"), windows(7, n=2)
    scheme = f"llm-compressor:{name}"
    result = zeroshot(model, load_tasks(TASKS, zeroshot_tasks), [parse_scheme(scheme)], tokenizer=tokenizer,
                      calibration=calib)
    results, samples = harness_direct(library_model(model, name, calib), tokenizer, zeroshot_tasks)
    assert_same_as_harness(result, scheme, results, samples)


@pytest.mark.parametrize("name", ["W8A8", "FP8"])
def test_the_exported_recipe_applied_by_compressed_tensors_is_the_plan_measured(name):
    """advise's recipe, its config group and ignore list applied by compressed-tensors, gives the model
    whose perplexity kernelscope measured for the plan; and read back as ``llm-compressor:@recipe.yaml``
    it is the same target."""
    import yaml

    from kernelscope.results import exports
    from kernelscope.runs.advise import advise

    model = wide_llama(torch.float32)
    chosen, calib, check = windows(11, n=3), windows(12, n=2), windows(13, n=2)
    scheme = parse_scheme(f"llm-compressor:{name}")
    result = advise(model, chosen, scheme, tolerance=1e-4, kernel_groups=(), calibration=calib)
    plan = result.summary["plan"]
    assert plan["kept_layers"] > 0
    recipe = yaml.safe_load(result.files[exports.RECIPE])
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    group = modifier["config_groups"]["group_0"]
    roles = [role for role in ("weights", "input_activations") if role in group]
    own = ct.QuantizationScheme(targets=group["targets"],
                                **{role: ct.QuantizationArgs(**group[role]) for role in roles})
    theirs = window_nll(library_model(model, name, calib, scheme=own, ignore=modifier["ignore"]), check)
    ours = evaluate(model, check, [scheme], ignore=plan["kept_modules"], calibration=calib).table
    assert ours["window_nll"][0].to_list() == theirs
