"""advise: sensitivity, the plan search, the replay of block outputs, the exports and eval --ignore."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kernelscope.cli import main
from kernelscope.data import make_windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import select_linear_layers
from kernelscope.results import SCHEMA_VERSION
from kernelscope.results import exports as X
from kernelscope.runs.advise import advise
from kernelscope.runs.evaluate import run_scheme
from kernelscope.runs.fakequant import SchemeApplied
from kernelscope.runs.schemes import parse_scheme
from kernelscope.runs.sensitivity import Probe, kernel_scheme, make_groups
from tests.conftest import tiny_model

PLANTED = "model.layers.1.mlp.down_proj"
W8A8 = parse_scheme("w8a8-per-token")


def sampled_windows(model, n: int = 4, seqlen: int = 64, seed: int = 0):
    """Windows the model itself wrote (temperature 0.5): full precision predicts them well, so that
    damage shows as loss rather than as noise around a uniform guess."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(seqlen - 1):
            logits = model(input_ids=ids).logits[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits / 0.5, -1), 1, generator=g)], dim=1)
    return make_windows(ids.reshape(-1), seqlen, n)


def plant(model, scale: float = 1000.0):
    """One huge input channel of block 1's down_proj (up_proj row 3 times ``scale``, down_proj column 3
    over it): full precision computes the same function, per-token quantization of that input does not."""
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3] *= scale
        model.model.layers[1].mlp.down_proj.weight[:, 3] /= scale
    return model


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("llama")
    windows = sampled_windows(model)
    return plant(model), windows


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: sorted(vars(m)) for n, m in model.named_modules()}, model.training)


def assert_as_found(model, before):
    state, attrs, training = before
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == attrs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training == training


@pytest.fixture(scope="module")
def advised_planted(planted):
    """One advice on the planted model, run in training mode to see the flag come back."""
    model, windows = planted
    model.train()
    before = snapshot(model)
    try:
        result = advise(model, windows, W8A8, tolerance=0.01)
        assert_as_found(model, before)
    finally:
        model.eval()
    return result


# -- sensitivity and the plan ------------------------------------------------------------------------

def test_planted_layer_is_kept_first(advised_planted):
    result = advised_planted
    s = result.summary
    ranks = {(r["group_kind"], r["group"]): r["rank"] for r in s["sensitivity"]}
    assert ranks[("module_type", "down_proj")] == 1 and ranks[("block", "block 1")] == 1
    assert result.tables["cells"]["cell"][0] == PLANTED
    assert s["plan"]["kept_modules"][0] == PLANTED and s["plan"]["within_tolerance"]
    assert s["quantized"]["vs_fp"] == "worse than fp"
    assert all(math.isfinite(r["delta_nll"]) and math.isfinite(r["kl"]) for r in s["sensitivity"])
    groups = s["groups"]
    assert (groups["count"], groups["module_type"], groups["block"]) == (6, 4, 2)


def test_the_search_ends_between_neighbours_and_counts_its_passes(advised_planted):
    s = advised_planted.summary
    search = advised_planted.tables["search"].to_dicts()
    kept = len(s["plan"]["kept_cells"])
    assert search[0]["kept_cells"] == 0 and not search[0]["within_tolerance"]
    assert any(r["kept_cells"] == kept and r["within_tolerance"] for r in search)
    assert kept == 1 or any(r["kept_cells"] == kept - 1 and not r["within_tolerance"] for r in search)
    # reference, whole scheme, whole kernel, 6 groups, 4 module-type kernels, the candidates after k = 0
    # (the search table's last row is fp itself: every cell kept, the reference pass)
    assert search[-1]["stage"] == "fp" and search[-1]["kept_cells"] == len(advised_planted.tables["cells"])
    assert s["runs"] == len(s["passes"]) == 3 + 6 + 4 + len(search) - 2
    assert s["forward_passes"] == pytest.approx(sum(p["cost"] for p in s["passes"]), abs=1e-3)
    assert [p["first_block"] for p in s["passes"] if p["stage"].startswith("block 1:")] == [1]


def test_per_layer_sensitivity_ranks_the_planted_layer_first(planted):
    model, windows = planted
    two = make_windows(windows.tokens[:2].reshape(-1), windows.seqlen, 2)
    s = advise(model, two, W8A8, tolerance=0.01, groups=("module_type", "block", "layer"),
               kernel_groups=()).summary
    layers = sorted((r for r in s["sensitivity"] if r["group_kind"] == "layer"), key=lambda r: r["rank"])
    assert len(layers) == 14 and layers[0]["group"] == PLANTED and layers[0]["kernel_delta_nll"] is None
    assert s["plan"]["kept_modules"][0] == PLANTED


def test_the_plan_reports_its_own_measurement(planted, advised_planted):
    model, windows = planted
    s = advised_planted.summary
    plan = s["plan"]
    quantized = [layer for layer in select_linear_layers(model) if layer.name not in plan["kept_modules"]]
    again = run_scheme(model, windows, W8A8, quantized)
    assert (again["perplexity"] == plan["perplexity"]
            and again["perplexity_ci_low"] == plan["perplexity_ci_low"])
    assert plan["full_precision_modules"] == [*plan["kept_modules"], "lm_head"]
    assert f"plan: keep {len(plan['kept_cells'])} of 8 cells" in plan["measured"]
    k, fp, q = s["kernel"], s["fp"], s["quantized"]
    assert s["kernel_explains"]["share"] == pytest.approx((k["nll"] - fp["nll"]) / (q["nll"] - fp["nll"]),
                                                          rel=1e-9)
    down = next(r for r in s["sensitivity"] if r["group"] == "down_proj")
    assert down["kernel_share"] == pytest.approx(down["kernel_delta_nll"] / down["delta_nll"], rel=1e-9)


def test_sensitivity_alone_ranks_groups_and_saves(planted, tmp_path):
    from kernelscope.runs.sensitivity import sensitivity

    model, windows = planted
    two = make_windows(windows.tokens[:2].reshape(-1), windows.seqlen, 2)
    result = sensitivity(model, two, W8A8, groups=("block",), kernel_groups=("block",))
    rows = result.table.to_dicts()
    assert [r["group"] for r in rows] == ["block 0", "block 1"] and rows[1]["rank"] == 1
    assert rows[1]["first_block"] == 1 and rows[1]["cost"] < 1 and rows[1]["kernel_delta_nll"] > 0
    assert result.summary["runs"] == 3 + 2 * 2
    assert json.loads((result.save(tmp_path / "sens") / "summary.json").read_text())["kind"] == "sensitivity"


def test_the_model_is_restored_when_a_pass_fails(planted):
    model, windows = planted
    before = snapshot(model)
    calls = [0]

    def progress(stage, done, total):
        calls[0] += 1
        if "block 1" in stage:  # a pass that starts at block 1, from the replay
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        advise(model, windows, W8A8, kernel_groups=(), progress=progress)
    assert calls[0] > 1
    assert_as_found(model, before)


def test_budget_plan_fits_its_budget(planted):
    model, windows = planted
    layers = select_linear_layers(model)
    sizes = {lay.name: lay.module.weight.numel() for lay in layers}
    share = sizes[PLANTED] / sum(sizes.values())
    s = advise(model, windows, W8A8, budget=share * 1.001, kernel_groups=()).summary
    assert s["plan"]["kept_modules"] == [PLANTED] and s["plan"]["parameter_share"] <= share * 1.001
    assert s["budget"] == pytest.approx(share * 1.001)
    with pytest.raises(ValueError, match="budget"):
        advise(model, windows, W8A8, budget=0.0)


# -- the parts --------------------------------------------------------------------------------------------

def test_replayed_block_outputs_give_the_full_pass_bit_for_bit(planted):
    model, windows = planted
    layers = select_linear_layers(model)
    probe = Probe(model, windows, layers, batch_size=3)  # a short last batch too
    probe.reference()
    block1 = [lay for lay in layers if lay.block == 1]
    replayed = probe.measure("replayed", W8A8, block1)
    whole = probe.measure("whole", W8A8, block1, skip=False)
    assert (replayed["first_block"], whole["first_block"]) == (1, 0)
    assert replayed["window_nll"] == whole["window_nll"] and replayed["kl"] == whole["kl"]
    assert replayed["cost"] < 1 == whole["cost"]
    assert run_scheme(model, windows, W8A8, block1, batch_size=3)["window_nll"] == whole["window_nll"]


def test_kl_equals_a_direct_computation(planted):
    model, windows = planted
    layers = select_linear_layers(model)
    probe = Probe(model, windows, layers)
    probe.reference()
    group = [lay for lay in layers if lay.module_type == "down_proj"]
    row = probe.measure("down", W8A8, group)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=windows.tokens).logits[:, :-1].double(), -1)
        with SchemeApplied(group, W8A8, seq_len=windows.seqlen):
            q = torch.log_softmax(model(input_ids=windows.tokens).logits[:, :-1].double(), -1)
    kl = (ref.exp() * (ref - q)).sum(-1).mean(-1)  # (W,)
    assert row["window_kl"] == pytest.approx(kl.tolist(), rel=1e-4)
    assert row["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)


@pytest.mark.parametrize(("family", "expected"), [
    ("llama", ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]),
    ("opt", ["q_proj+k_proj+v_proj", "out_proj", "fc1", "fc2"]),
    ("gpt2", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
])
def test_module_type_groups_follow_the_inputs_layers_share(family, expected):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    windows = make_windows(torch.randint(1, 500, (2 * 16,), generator=g), 16, 2)
    probe = Probe(model, windows, select_linear_layers(model))
    probe.reference()
    groups = make_groups(probe.selected, probe.shared, ("module_type",))
    assert [grp.name for grp in groups] == expected
    assert sum(len(grp.layers) for grp in groups) == len(probe.selected)


def test_kernel_scheme_is_the_remove_kernel_of_the_same_quantizer():
    for name in ("w8a8-per-token", "w4a8-g128-crossquant", "nvfp4", "w8a8-smoothquant"):
        s = parse_scheme(name)
        k = kernel_scheme(s)
        assert (k.mode, k.activation, k.weight_bits, k.weight_format, k.transform) == (
            "remove_kernel", s.activation, None, None, s.transform)
    with pytest.raises(ValueError):
        kernel_scheme(parse_scheme("fp"))


# -- exports ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["w8a8-crossquant", "w8a8-per-channel", "w8a8-smoothquant",
                                    "remove-kernel-per-token"])
def test_schemes_without_a_deployed_equivalent_say_why(scheme):
    d = X.deployment(parse_scheme(scheme))
    for export in (d.llmcompressor, d.modelopt):
        assert not export.ok and scheme in export.reason and export.weights is None


@pytest.mark.parametrize("scheme", ["fp8", "llm-compressor:W8A8", "llm-compressor:W4A8",
                                    "llm-compressor:NVFP4", "llm-compressor:MXFP4"])
def test_recipe_validates_against_compressed_tensors_and_ignores_exactly_the_kept_layers(scheme):
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.utils import match_named_modules

    yaml = pytest.importorskip("yaml")
    model = tiny_model("llama")
    kept = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj", PLANTED]
    export = X.deployment(parse_scheme(scheme)).llmcompressor
    text = X.recipe_yaml(export, [*kept, "lm_head"], ["a comment"])
    assert text.startswith("# a comment\n") and "note" not in yaml.safe_load(text)
    mod = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert set(mod) == {"targets", "config_groups", "ignore"}
    assert mod["targets"] == ["Linear"] and mod["ignore"] == [*kept, "lm_head"]
    groups = {k: ct.QuantizationScheme.model_validate(v) for k, v in mod["config_groups"].items()}
    preset = ct.preset_name_to_scheme(export.preset, ["Linear"])  # the preset these arguments are
    for role in ("weights", "input_activations"):
        fields = set(mod["config_groups"]["group_0"].get(role) or ())
        ours, theirs = getattr(groups["group_0"], role), getattr(preset, role)
        assert (ours is None) == (theirs is None) and bool(fields) == (ours is not None), role
        if ours is not None:  # every field that decides the arithmetic, as the preset has it
            assert ours.model_dump(include=fields) == theirs.model_dump(include=fields), role
    config = ct.QuantizationConfig(config_groups=groups, ignore=mod["ignore"])
    targets = {t for g in config.config_groups.values() for t in g.targets}
    matched = {name for name, _ in match_named_modules(model, targets, config.ignore)}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert matched == linear - set(kept) - {"lm_head"}


def test_ignore_files_read_back(tmp_path):
    modules = {"model.layers.0.mlp.up_proj": "Linear", "model.layers.1.mlp.up_proj": "Linear",
               "lm_head": "Linear"}
    (tmp_path / "m.txt").write_text("# kept\nmodel.layers.0.mlp.up_proj\n\n")
    (tmp_path / "r.yaml").write_text("s:\n  m:\n    QuantizationModifier:\n"
                                     "      ignore: [lm_head, 're:.*1\\.mlp']\n")
    (tmp_path / "q.json").write_text(json.dumps({"quant_cfg": {"*layers.0.*": {"enable": False}}}))
    (tmp_path / "all.json").write_text(json.dumps({"quant_cfg": {"*layers.0.*": {"enable": False},
                                                                 "default": {"enable": False}}}))
    entries = [{"quantizer_name": "*", "enable": False},
               {"quantizer_name": "model.layers.1.mlp.up_proj.*_quantizer", "cfg": {"num_bits": 8}},
               {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False}]
    (tmp_path / "q.yaml").write_text(f"quant_cfg: {json.dumps(entries)}\nalgorithm: max\n")
    (tmp_path / "summary.json").write_text(json.dumps({"kind": "advise",
                                                       "plan": {"full_precision_modules": ["lm_head"]}}))
    assert X.read_ignore_file(tmp_path / "m.txt", "f").resolve(modules) == ["model.layers.0.mlp.up_proj"]
    assert X.read_ignore_file(tmp_path / "r.yaml", "f").resolve(modules) == ["lm_head",
                                                                            "model.layers.1.mlp.up_proj"]
    # ModelOpt's quant_cfg, in its order: an older kernelscope file disables the kept layers after a base
    # config that quantizes every Linear; "default" is every quantizer
    assert X.read_ignore_file(tmp_path / "q.json", "f").resolve(modules) == ["model.layers.0.mlp.up_proj"]
    assert X.read_ignore_file(tmp_path / "all.json", "f").resolve(modules) == sorted(modules)
    assert X.read_ignore_file(tmp_path / "q.yaml", "f").resolve(modules) == ["lm_head",
                                                                            "model.layers.0.mlp.up_proj"]
    assert X.read_ignore_file(tmp_path, "f").resolve(modules) == ["lm_head"]  # the folder: its summary
    older = tmp_path / "older"  # an advice folder of schema version 2 named its summary advice.json
    older.mkdir()
    (older / "advice.json").write_text(json.dumps({"kind": "advise",
                                                   "plan": {"full_precision_modules": ["lm_head"]}}))
    assert X.read_ignore_file(older, "f").resolve(modules) == ["lm_head"]
    with pytest.raises(KernelscopeError, match="no Linear layer of this model"):
        X.read_ignore_file(tmp_path / "m.txt", "f").resolve({"lm_head": "Linear"})
    (tmp_path / "empty.txt").write_text("")  # the modules.txt of a plan that keeps nothing
    assert X.read_ignore_file(tmp_path / "empty.txt", "f").resolve(modules) == []
    (tmp_path / "half.json").write_text(json.dumps({"quant_cfg": [
        {"quantizer_name": "lm_head.input_quantizer", "enable": False}]}))
    with pytest.raises(KernelscopeError, match="only the weight quantizer of lm_head"):
        X.read_ignore_file(tmp_path / "half.json", "f").resolve(modules)


# -- the command line ----------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def advised(tmp_path_factory, tiny_llama_dir, text_file):
    """One advice folder from the command line, with a tolerance tight enough to keep layers."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("advice") / "plan"
    args = ["advise", str(tiny_llama_dir), "-d", str(text_file), "-n", "3", "-s", "64", "--scheme",
            "w8a8-per-token", "--tolerance", "0.0001", "-o", str(out), "--quiet"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return out, json.loads((out / "summary.json").read_text()), buf.getvalue()


def test_advise_writes_the_folder_and_exports(advised):
    out, body, stdout = advised
    assert {p.name for p in out.iterdir()} >= {"summary.json", "modelopt_quant_cfg.yaml", "modules.txt",
                                               "sensitivity.parquet", "cells.parquet", "search.parquet"}
    exports = body["exports"]  # compressed-tensors' INT8 scale is amax / 127.5: no recipe for w8a8-per-token
    assert not (out / "recipe.yaml").exists() and exports["recipe"] is None
    assert "127.5" in exports["recipe_note"]
    assert exports["modelopt"] == "modelopt_quant_cfg.yaml" and exports["modelopt_algorithm"] == "max"
    assert all(n.startswith("ModelOpt: per_token: ") for n in exports["notes"])
    assert (body["kind"] == "advise" and body["schema_version"] == SCHEMA_VERSION
            and body["plan"]["kept_layers"] > 0)
    assert (out / "modules.txt").read_text().split() == body["plan"]["kept_modules"]
    assert "plan perplexity" in stdout and "forward passes" in stdout and "no recipe.yaml: " in stdout
    assert "modelopt_quant_cfg.yaml" in stdout


@pytest.mark.parametrize("which", ["modelopt_quant_cfg.yaml", "summary.json", "", "modules.txt"])
def test_eval_ignore_reproduces_the_plan_exactly(capsys, advised, tiny_llama_dir, text_file, which):
    out, body, _ = advised
    code, stdout, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "3",
                                   "-s", "64", "--scheme", "w8a8-per-token", "--ignore", f"@{out / which}",
                                   "--json")
    assert code == 0, stderr
    row = json.loads(stdout)["results"][0]
    assert row["perplexity"] == body["plan"]["perplexity"]
    assert row["perplexity_ci_high"] == body["plan"]["perplexity_ci_high"]


def test_eval_ignore_by_regex(capsys, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "32", "--scheme", "fp,w8a8-per-token", "--ignore", r"layers\.1\.mlp",
                                   "--json")
    assert code == 0, stderr
    body = json.loads(stdout)
    assert body["layers"]["full_precision"] == [f"model.layers.1.mlp.{t}"
                                                for t in ("gate_proj", "up_proj", "down_proj")]
    assert body["layers"]["count"] == 11 and body["results"][1]["vs_fp"]


def test_overwrite_replaces_an_advice_folder_and_nothing_foreign(capsys, advised, tiny_llama_dir, text_file,
                                                                 tmp_path):
    out, _, _ = advised
    target = tmp_path / "again"
    target.mkdir()
    for f in out.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    args = ["advise", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "32", "--scheme",
            "w4a8-g128-per-token", "--kernel-groups", "none", "-o", str(target), "--quiet"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = run_cli(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert json.loads((target / "summary.json").read_text())["scheme"]["scheme"] == "w4a8-g128-per-token"
    (target / "notes.md").write_text("mine")
    code, _, stderr = run_cli(capsys, *args, "--overwrite")
    assert code == 2 and "notes.md" in stderr and (target / "notes.md").read_text() == "mine"


def test_export_names_are_kernelscopes_only_beside_an_advice(tmp_path):
    from kernelscope.results.paths import foreign_entries

    (tmp_path / "summary.json").write_text('{"schema_version": 3, "kind": "eval"}')
    (tmp_path / "modules.txt").write_text("a user's own list\n")
    assert foreign_entries(tmp_path) == ["modules.txt"]
    (tmp_path / "summary.json").write_text('{"schema_version": 3, "kind": "advise"}')
    assert foreign_entries(tmp_path) == []
    (tmp_path / "summary.json").unlink()
    (tmp_path / "advice.json").write_text("{}")  # an advice folder of schema version 2
    assert foreign_entries(tmp_path) == []


BAD_ADVISE = [
    (["--scheme", "w8a8-bogus"], "unknown scheme"),
    (["--scheme", "fp"], "quantizes no activation"),
    (["--scheme", "w8a8-per-token,W8A8-per-token"], "is given twice"),
    (["--scheme", "w8a8-per-token", "--budget", "0"], "--budget 0 is out of range"),
    (["--scheme", "w8a8-per-token", "--budget", "1.5"], "--budget 1.5 is out of range"),
    (["--scheme", "w8a8-per-token", "--budget", "nan"], "--budget nan is out of range"),
    (["--scheme", "w8a8-per-token", "--tolerance", "0"], "--tolerance must be a positive number"),
    (["--scheme", "w8a8-per-token", "--tolerance", "-0.1"], "--tolerance must be a positive number"),
    (["--scheme", "w8a8-per-token", "--kernel-groups", "layer"], "needs --per-layer"),
    (["--scheme", "w8a8-per-token", "--kernel-groups", "blocks"], "is not a kind of group"),
    (["--scheme", "w8a8-per-token", "-a", "0.3"], "-a has no effect here"),
    (["--scheme", "w8a8-per-token", "-n", "1"], "at least 2"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_ADVISE)
def test_bad_advise_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_llama_dir, text_file, extra, message):
    out = tmp_path / "never"
    code, _, stderr = run_cli(capsys, "advise", str(tiny_llama_dir), "-d", str(text_file), "-s", "32",
                              "-o", str(out), *extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_bad_ignore_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_llama_dir, text_file):
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    (tmp_path / "plain.yaml").write_text("a: 1\n")
    (tmp_path / "wrong.txt").write_text("model.layers.9.mlp.up_proj\n")
    cases = [
        ("@" + str(tmp_path / "missing.yaml"), "does not exist"),
        ("@" + str(tmp_path / "other.json"), "is not an advice file"),
        ("@" + str(tmp_path / "broken.yaml"), "not valid YAML"),
        ("@" + str(tmp_path / "plain.yaml"), "no QuantizationModifier"),
        ("@" + str(tmp_path / "wrong.txt"), "no Linear layer of this model"),
        ("(", "not a valid regular expression"),
        ("no_such_layer", "matches none of the 14 layers"),
    ]
    for value, message in cases:
        out = tmp_path / "never"
        code, _, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                  "-s", "32", "--scheme", "w8a8-per-token", "--ignore", value, "-o", str(out))
        assert code == 2 and message in stderr and "Traceback" not in stderr, (value, stderr)
        assert len(stderr.strip().splitlines()) == 1 and not out.exists()
    code, _, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "--scheme", "fp",
                              "--ignore", "q_proj")
    assert code == 2 and "--ignore has no effect here" in stderr


def test_a_cell_s_loss_from_its_module_type_alone_is_its_share_of_the_type_s_parameters():
    """Without block groups a cell's estimate is its module type's loss times its share of that type's
    parameters (a type's loss spread over the layers of that type by size)."""
    from torch import nn

    from kernelscope.models.layers import LinearLayer
    from kernelscope.runs.advise import estimate_losses, make_cells

    small, large = nn.Linear(4, 2, bias=False), nn.Linear(4, 6, bias=False)  # 8 and 24 parameters
    layers = [LinearLayer("a.q_proj", small, 0, "q_proj", 4), LinearLayer("b.q_proj", large, 1, "q_proj", 4)]
    rows = [{"group": "q_proj", "group_kind": "module_type", "layers": ["a.q_proj", "b.q_proj"],
             "parameters": 32, "delta_nll": 0.4}]
    assert estimate_losses(make_cells(layers, []), rows, "delta_nll") == [0.4 * 8 / 32, 0.4 * 24 / 32]
