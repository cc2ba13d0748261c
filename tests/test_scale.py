"""Big models and many processes: device-map offload and torchrun data parallelism change where the
work happens, never a statistic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import kernelscope as ks
from kernelscope.errors import KernelscopeError
from kernelscope.models import select_linear_layers
from kernelscope.runs.distributed import World
from kernelscope.runs.evaluate import run_scheme
from kernelscope.runs.schemes import parse_scheme


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A LLaMA-architecture model of about 1.2 MB of float32 weights, saved as a local folder."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("wide-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_offloaded_model_gives_identical_statistics(wide_llama_dir, tmp_path):
    weights = sum(f.stat().st_size for f in wide_llama_dir.glob("*.safetensors"))
    cap = 300_000
    assert weights > 3 * cap  # the model does not fit in the memory given
    whole = ks.load_model(str(wide_llama_dir))
    capped = ks.load_model(str(wide_llama_dir), device_map="auto", max_memory=f"cpu={cap}",
                           offload_folder=tmp_path / "offload")
    placement = capped.info["placement"]
    assert placement.get("disk", 0) > 0, placement  # some layers really live on disk
    assert any(p.device.type == "meta" for p in capped.model.parameters())
    text = ks.load_text("pydoc")
    windows = ks.make_windows(ks.tokenize(whole.tokenizer, text.text[:40_000]), 48, 3)
    a = ks.profile(whole, windows, ks.default_configs())
    b = ks.profile(capped, windows, ks.default_configs())
    assert a.layers.equals(b.layers)
    assert b.summary["model"]["placement"] == placement

    fp, w8 = parse_scheme("fp"), parse_scheme("w8a8-crossquant")
    layers = select_linear_layers(capped.model)
    assert run_scheme(capped.model, windows, fp, layers)["perplexity"] == run_scheme(
        whole.model, windows, fp, select_linear_layers(whole.model))["perplexity"]
    with pytest.raises(KernelscopeError, match="offloaded"):
        run_scheme(capped.model, windows, w8, layers)


@pytest.mark.parametrize("options, message", [
    (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
    (["--device-map", "everywhere"], "unknown --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "not a size"),
    (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "unknown device"),
    (["--offload-folder", "x"], "--offload-folder needs --device-map"),
])
def test_placement_options_are_checked(wide_llama_dir, options, message):
    run = subprocess.run([sys.executable, "-m", "kernelscope", "profile", str(wide_llama_dir), "-d", "pydoc",
                          "-n", "1", "--seqlen", "16", *options], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_world_shares_cover_every_window_once():
    for n in range(1, 12):
        for size in range(1, 5):
            shares = [World(rank, size).windows(n) for rank in range(size)]
            assert [w for share in shares for w in share] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_torchrun_two_processes_equal_one(tiny_llama_dir, text_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per process in both runs
    common = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "5", "--seqlen", "32", "--quiet",
              "-q", "per_token,crossquant,per_group,mxfp4,nvfp4", "--group-size", "16"]  # both kinds of count
    parallel = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "kernelscope", *common, "-o", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "kernelscope", *common, "-o", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    two = pl.read_parquet(tmp_path / "two" / "layers.parquet")
    one = pl.read_parquet(tmp_path / "one" / "layers.parquet")
    assert two.equals(one)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 5 * 32
    assert parallel.stdout.count("wrote ") == 1  # only the first process writes and prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_a_failed_load_leaves_the_offload_folder_as_it_was(tmp_path, monkeypatch):
    import kernelscope.models.loading as loading

    def offloads_then_fails(spec, **kwargs):
        folder = Path(kwargs["offload_folder"])
        folder.mkdir(exist_ok=True)
        (folder / "model.layers.0.weight.safetensors").write_bytes(b"w" * 64)
        (folder / "index").mkdir()
        raise loading.KernelscopeError("the model cannot be placed")

    monkeypatch.setattr(loading, "_load_model", offloads_then_fails)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    for folder in (mine, tmp_path / "new"):
        with pytest.raises(loading.KernelscopeError, match="cannot be placed"):
            loading.load_model("demo", device_map="auto", offload_folder=folder)
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"] and not (tmp_path / "new").exists()
