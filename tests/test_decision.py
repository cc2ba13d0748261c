"""The decision: a plan chosen on some windows is measured again on others, and that held-out figure is
the one reported."""

from __future__ import annotations

import json

import pytest
import torch

from kernelscope.data import make_windows
from kernelscope.runs.advise import advise
from kernelscope.runs.evaluate import evaluate
from kernelscope.runs.schemes import parse_scheme
from tests.conftest import tiny_model
from tests.test_cli import run_cli
from tests.test_trust import assert_refused


def test_windows_split_into_disjoint_parts_of_one_text():
    ids = torch.arange(10_000)
    chosen, held = make_windows(ids, 50, 10).split(6)
    assert (len(chosen), len(held)) == (6, 4)
    assert not set(chosen.starts) & set(held.starts)
    assert torch.equal(torch.cat([chosen.tokens, held.tokens]), make_windows(ids, 50, 10).tokens)
    assert "held-out part of the first 10" in held.describe() and held.as_dict()["part"] == "held-out"
    with pytest.raises(ValueError, match="cannot split"):
        make_windows(ids, 50, 3).split(3)


def test_the_held_out_figure_is_the_plan_evaluated_on_the_held_out_windows():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    chosen, held = make_windows(torch.randint(1, 500, (12 * 32,), generator=g), 32, 12).split(6)
    scheme = parse_scheme("w4a4-per-token")
    result = advise(model, chosen, scheme, tolerance=0.02, holdout=held, kernel_groups=())
    plan = result.summary["plan"]
    h = plan["holdout"]
    assert h["windows"]["starts"] == held.starts
    again = evaluate(model, held, [parse_scheme("fp"), scheme], ignore=plan["kept_modules"]).table
    assert h["plan"]["perplexity"] == again["perplexity"][1]
    assert h["fp"]["perplexity"] == again["perplexity"][0]
    assert h["plan"]["change_pct"] == pytest.approx(again["change_pct"][1])
    whole = evaluate(model, held, [parse_scheme("fp"), scheme]).table
    assert h["quantized"]["perplexity"] == whole["perplexity"][1]
    assert h["within_tolerance"] == (again["perplexity"][1] <= again["perplexity"][0] * 1.02)


def test_advise_holds_out_as_many_windows_by_default_and_says_how_the_plan_fared(
        capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "plan"
    common = ["advise", str(tiny_llama_dir), "--dataset", str(text_file), "-n", "4", "--seqlen", "32",
              "--scheme", "w8a8-per-token", "--kernel-groups", "none"]
    code, stdout, stderr = run_cli(capsys, *common, "-o", str(out))
    assert code == 0, stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["windows"]["windows"] == 4 and s["plan"]["holdout"]["windows"]["windows"] == 4
    assert min(s["plan"]["holdout"]["windows"]["starts"]) > max(s["windows"]["starts"])
    assert "held out (4 windows the plan was not chosen on)" in " ".join(stdout.split())
    code, stdout, stderr = run_cli(capsys, *common, "--holdout", "0", "--json")
    assert code == 0, stderr
    assert "holdout" not in json.loads(stdout)["plan"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--holdout", "-1"], "--holdout -1 is negative"),
    (["-n", "all", "--holdout", "2"], "--holdout needs a number of --nsamples windows"),
    (["-n", "1", "--holdout", "3"], "-n 1 is too few windows to choose a plan on"),
])
def test_bad_holdout_is_one_line(capsys, tmp_path, tiny_llama_dir, text_file, extra, message):
    args = ["advise", str(tiny_llama_dir), "--dataset", str(text_file), "--seqlen", "32", "--scheme",
            "w8a8-per-token", *(["-n", "4"] if "-n" not in extra else []), *extra]
    assert_refused(capsys, args, message, tmp_path)


# -- deploy candidates ----------------------------------------------------------------------------------

from kernelscope.quant.transforms import parse_transform  # noqa: E402
from kernelscope.runs import candidates as C  # noqa: E402


@pytest.mark.parametrize(("scheme", "bits"), [
    ("nvfp4", 4 + 8 / 16), ("mxfp4", 4 + 8 / 32), ("w4a8-g128-per-token", 4 + 16 / 128), ("fp8", 8),
    ("w8a8-per-token", 8), ("llm-compressor:NVFP4", 4 + 8 / 16), ("llm-compressor:W4A16", 4 + 16 / 128),
    ("llm-compressor:MXFP4", 4 + 8 / 32), ("modelopt:INT8_DEFAULT_CFG", 8), ("remove-kernel-per-token", 16),
])
def test_bits_per_weight_count_the_block_scales(scheme, bits):
    assert C.weight_bits(parse_scheme(scheme)) == pytest.approx(bits)


@pytest.mark.parametrize(("scheme", "transform", "status"), [
    ("llm-compressor:W8A8", "none", C.EXACT),
    ("modelopt:FP8_DEFAULT_CFG", "none", C.EXACT),
    ("llm-compressor:W8A8", "hadamard", C.APPROXIMATE),
    ("w8a8-crossquant", "none", C.NONE),
    ("w8a8-crossquant", "hadamard", C.NONE),
    ("remove-kernel-per-token", "none", C.NONE),
    ("mxfp4", "none", C.NONE),  # OCP FLOOR scales: neither library's MXFP4
])
def test_only_what_a_library_computes_is_deployable(scheme, transform, status):
    found, how = C.deployability(parse_scheme(scheme), parse_transform(transform))
    assert found == status, how
    assert how


def _row(scheme, deployable, within, bits, change, transform="none"):
    return {"scheme": scheme, "transform": transform, "deployable": deployable, "within_tolerance": within,
            "bits_per_weight": bits, "change_pct": change}


def test_the_ranking_puts_the_deployable_candidate_with_fewest_bits_within_tolerance_first():
    rows = [
        _row("crossquant", C.NONE, True, 8.0, 0.1),  # the best figure, but a diagnostic
        _row("w8a8 keeping 33 layers", C.EXACT, True, 9.25, 0.47),
        _row("w8a8", C.APPROXIMATE, True, 8.0, 0.19, transform="hadamard"),  # a transform, nothing kept
        _row("fp8", C.EXACT, True, 8.0, 0.30),
        _row("nvfp4", C.EXACT, False, 4.5, 5.0),  # fewest bits, but beyond tolerance
    ]
    ranked = C.rank(rows)
    assert [(r["scheme"], r["rank"]) for r in ranked] == [
        ("fp8", 1), ("w8a8", 2), ("w8a8 keeping 33 layers", 3), ("nvfp4", 4), ("crossquant", 5)]
    alone = C.rank([_row("w8a8 keeping 33 layers", C.EXACT, True, 9.25, 0.47),
                    _row("w8a8", C.APPROXIMATE, True, 8.0, 0.19, transform="hadamard")])
    assert alone[0]["transform"] == "hadamard"  # a transform that needs no keep-list beats one that does


def test_advise_ranks_candidates_and_the_first_is_the_plan_written(capsys, tmp_path, tiny_llama_dir,
                                                                    text_file):
    import polars as pl

    out = tmp_path / "plan"
    code, stdout, stderr = run_cli(capsys, "advise", str(tiny_llama_dir), "--dataset", str(text_file), "-n",
                                   "4", "--seqlen", "32", "--scheme", "w8a8-crossquant,llm-compressor:W8A8",
                                   "--transform", "none,hadamard", "--kernel-groups", "none", "-o", str(out))
    assert code == 0, stderr
    s = json.loads((out / "summary.json").read_text())
    table = pl.read_parquet(out / "candidates.parquet")
    assert table.height == 4 and table["rank"].to_list() == [1, 2, 3, 4]
    first = s["candidates"][0]
    assert (s["scheme"]["scheme"], s["transform"]) == (first["scheme"], first["transform"])
    assert first["deployable"] != C.NONE
    assert set(table.filter(pl.col("scheme") == "w8a8-crossquant")["deployable"]) == {C.NONE}
    assert "Deploy candidates, ranked (held out" in stdout
