"""The report's decision read as words and values, without a page: which candidate is called best and why
each other ranks behind it, what is deployable and how, what was not evaluated, where a kernel lies
against the thresholds located for its family (and the paper's reference beside it), and the advice on
4-bit activations; from real advise runs of the command line and from summaries written out here."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from kernelscope.quant.targets import TARGETS
from kernelscope.quant.transforms import TRANSFORMS
from kernelscope.reports import decision as D
from kernelscope.reports import numbers as N
from kernelscope.results import RunFolder, read_run
from kernelscope.runs.candidates import rank
from tests.test_report_decision import behind, plans, ranked, weight_bits  # noqa: F401  (plans: fixture)

TOLERANCE = 0.01


def offer(scheme: str, **fields) -> dict:
    """A deploy candidate row as advise writes it: held out, within tolerance, exact, 8 bits per weight,
    unless ``fields`` say otherwise."""
    row = {"scheme": scheme, "transform": "none", "deployable": "exact", "deploy_with": "llm-compressor",
           "kept_layers": 0, "parameter_share_kept": 0.0, "bits_per_weight": 8.0, "selection_change_pct": 0.2,
           "selection_within_tolerance": True, "held_out": True, "change_pct": 0.3,
           "change_pct_ci_low": 0.1, "change_pct_ci_high": 0.5, "perplexity": 10.0, "within_tolerance": True}
    return row | fields


def advice(rows: list[dict], **fields) -> dict:
    """An advise summary ranking ``rows`` as written (their ``rank`` in the order given), on 4 windows
    with 4 held out, never written to a folder."""
    return {"kind": "advise", "tolerance": TOLERANCE, "model": {"model": "tiny"},
            "text": {"source": "text.txt"}, "windows": {"windows": 4, "seqlen": 32},
            "scheme": {"scheme": rows[0]["scheme"]}, "transform": rows[0]["transform"],
            "plan": {"holdout": {"windows": {"windows": 4}}},
            "candidates": [r | {"rank": i} for i, r in enumerate(rows, start=1)]} | fields


def naive_key(row: dict) -> tuple:
    """The ranking written out: deployable before diagnostic, within tolerance before not, fewer bits per
    weight, exact before approximate, the smaller change from fp (none, or not finite, last)."""
    change = row["change_pct"]
    known = change is not None and math.isfinite(change)
    return (row["deployable"] == "none", not row["within_tolerance"], round(row["bits_per_weight"], 6),
            row["deployable"] != "exact", change if known else math.inf)


# -- the ranking, shared by the run that ranks and the report that explains ------------------------------

def test_the_ranking_and_the_reason_behind_agree_with_the_rule_written_out():
    rng = random.Random(7)
    rows = [offer(f"s{i}", deployable=rng.choice(["exact", "approximate", "none"]),
                  within_tolerance=rng.random() < 0.6,
                  bits_per_weight=rng.choice([4.25, 4.5, 8.0, 8.0000001]),  # the last rounds to 8
                  change_pct=rng.choice([0.1, 0.4, 0.4, 2.0, None, math.nan]))
            for i in range(300)]
    ordered = rank(rows)
    assert [r["scheme"] for r in ordered] == [r["scheme"] for r in sorted(rows, key=naive_key)]
    assert [r["rank"] for r in ordered] == list(range(1, len(rows) + 1))
    deployable = [r for r in ordered if r["deployable"] != "none"]
    best, reasons = deployable[0], set()
    for other in deployable[1:]:
        same_tier = naive_key(other)[:4] == naive_key(best)[:4]
        unknown = other["change_pct"] is None or not math.isfinite(other["change_pct"])
        # a change from fp that is not known, or equal, puts nothing behind: no reason is named
        tied = same_tier and (unknown or other["change_pct"] == best["change_pct"])
        expected = "" if tied else behind(best, other)
        assert D.behind(best, other) == expected, other
        reasons.add(expected.split(" (")[0])
    assert reasons == {"", "it does not hold the tolerance", "more bits per weight",
                       "it is deployed approximately, the first exactly", "a larger change from fp"}


def test_why_a_candidate_ranks_behind_names_the_first_rule_that_puts_it_there():
    first = offer("a", bits_per_weight=4.25, change_pct=0.4)
    cases = {"it does not hold the tolerance": offer("b", within_tolerance=False, bits_per_weight=4.0,
                                                     change_pct=0.0),
             "more bits per weight (8.00 against 4.25)": offer("c", bits_per_weight=8.0, change_pct=0.0,
                                                                 deployable="approximate"),
             "it is deployed approximately, the first exactly": offer(
                 "d", bits_per_weight=4.25, deployable="approximate", change_pct=0.0),
             "a larger change from fp": offer("e", bits_per_weight=4.25, change_pct=0.9)}
    for words, other in cases.items():
        assert D.behind(first, other) == words
        assert D.behind(other, first) == ""  # the first ranks ahead: nothing puts it behind
        assert rank([other, first])[0]["scheme"] == "a"
    assert D.behind(first, dict(first, scheme="twin")) == ""  # a tie: no rule puts it behind


# -- the candidate to deploy --------------------------------------------------------------------------

def test_the_first_deployable_candidate_of_a_real_run_is_the_one_to_deploy(plans):  # noqa: F811
    run = read_run(plans["candidates"])
    s = run.summary
    said = D.deploy_decision(s, run)
    rows = ranked(s)
    deployable = [r for r in rows if r["deployable"] != "none"]
    best = deployable[0]
    assert said.best["scheme"] == best["scheme"] and said.best["transform"] == best["transform"]
    assert said.lead.kind == "deploy"
    lead = D.plain(said.lead.words)
    assert lead.startswith(f"Deploy {best['scheme']} with {best['kept_layers']} Linear layer")
    assert (f"{N.percent(best['change_pct'], signed=True)} "
            f"{N.interval(best['change_pct_ci_low'], best['change_pct_ci_high'], signed=True)} on "
            f"{s['plan']['holdout']['windows']['windows']} held-out windows") in lead
    runners = [D.plain(line) for line in said.runners]
    assert len(runners) == min(D.SHOWN_RUNNERS_UP, len(deployable) - 1) == 2
    for line, r in zip(runners, deployable[1:], strict=False):
        basis = "" if r["transform"] == "none" else f" in the {r['transform']} basis"
        assert line.startswith(f"#{r['rank']} {r['scheme']}{basis}: ")
        assert line.endswith(f"(behind #{best['rank']}: {behind(best, r)})")
    diagnostics = [r for r in rows if r["deployable"] == "none"]
    basis = {r["transform"]: "" if r["transform"] == "none" else f" in the {r['transform']} basis"
             for r in rows}
    assert [D.plain(line).split(":")[0] for line in said.diagnostics] == [
        f"#{r['rank']} {r['scheme']}{basis[r['transform']]}" for r in diagnostics]
    expected = ["deploy", *["runner-up"] * D.SHOWN_RUNNERS_UP]
    assert D.roles(rows) == ["diagnostic" if r["deployable"] == "none" else
                             (expected[deployable.index(r)] if deployable.index(r) < len(expected) else "")
                             for r in rows]
    files = [D.plain(p) for p in said.files]
    folder, exports = plans["candidates"].resolve(), s["exports"]
    written = [exports[k] for k in ("recipe", "modelopt", "modules") if exports.get(k)]
    assert files[0].startswith("Files: ") and written
    assert all(str(folder / name) in files[0] for name in written)
    assert files[1].startswith("Measure it again on the windows it was chosen on: kernelscope eval ")
    assert files[1].endswith(f"--ignore @{folder}")


def test_when_no_candidate_holds_the_tolerance_the_first_screen_warns_first():
    rows = [offer("a", within_tolerance=False, change_pct=1.5, change_pct_ci_low=1.2, change_pct_ci_high=1.8,
                  selection_change_pct=0.9),
            offer("b", within_tolerance=False, bits_per_weight=16.0, change_pct=1.1)]
    said = D.deploy_decision(advice(rows))
    lead = D.plain(said.lead.words)
    assert said.lead.kind == "failed" and said.best["scheme"] == "a"
    assert lead == ("The plan failed its held-out check. a with 0 Linear layers kept in full precision "
                    "(0.00% of the covered parameters): +1.50% [+1.20%, +1.80%] on 4 held-out windows, "
                    "beyond the 1% tolerance (+0.90% on the windows it was chosen on). No deployable "
                    "candidate held it. Do not deploy it as it is: advise on more windows (-n) chooses on "
                    "more evidence, and a smaller --tolerance keeps more layers.")
    assert [w.text for w in said.lead.words if isinstance(w, D.Marked) and w.mark == D.CODE] == [
        "-n", "--tolerance"]
    assert D.plain(said.runners[0]).endswith("(behind #1: more bits per weight (16.00 against 8.00))")
    alone = D.deploy_decision(advice(rows[:1]))  # one candidate: no other could have held it
    assert alone.lead.kind == "failed" and "No deployable candidate" not in D.plain(alone.lead.words)


def test_a_tie_is_kept_in_rank_order_and_names_no_reason():
    rows = [offer("a"), offer("b")]
    assert [r["scheme"] for r in rank(rows)] == ["a", "b"]
    said = D.deploy_decision(advice(rows))
    assert said.best["scheme"] == "a"
    line = D.plain(said.runners[0])
    assert line.startswith("#2 b: +0.30% [+0.10%, +0.50%] on 4 held-out windows, within the 1% tolerance by "
                           "its interval; 0 layers kept (0.00% of the parameters), 8.00 bits per weight; "
                           "deployed exactly as measured: llm-compressor")
    assert "behind" not in line


def test_a_diagnostic_better_than_every_deployable_one_is_never_recommended():
    rows = [offer("w8a8", deployable="approximate", change_pct=0.8, change_pct_ci_high=0.95),
            offer("w8a8-crossquant", deployable="none", deploy_with="no library computes CrossQuant",
                  bits_per_weight=4.0, change_pct=-0.5)]
    said = D.deploy_decision(advice(rows))
    assert said.best["scheme"] == "w8a8" and "crossquant" not in D.plain(said.lead.words)
    assert D.better(rows[1], said.best) and not D.better(rows[0] | {"within_tolerance": False}, said.best)
    assert said.runners == []
    (line,) = [D.plain(x) for x in said.diagnostics]
    assert line.startswith("#2 w8a8-crossquant: -0.50%")
    assert line.endswith("no deployment path: no library computes CrossQuant (a better figure than the "
                         "candidate to deploy)")
    nothing = D.deploy_decision(advice([r | {"deployable": "none"} for r in rows]))
    assert nothing.best is None and nothing.lead.kind == "failed"
    assert D.plain(nothing.lead.words).startswith("No candidate can be deployed as measured")
    assert nothing.runners == nothing.files == nothing.untried == [] and len(nothing.diagnostics) == 2
    assert not any("better figure" in D.plain(x) for x in nothing.diagnostics)  # nothing to be better than


def test_whether_a_candidate_holds_the_tolerance_is_said_by_its_interval_or_its_point_estimate():
    within, beyond = offer("a"), offer("a", within_tolerance=False)
    reach, one = offer("a", change_pct_ci_high=1.4), offer("a", change_pct_ci_high=None)
    assert D.holds(within, TOLERANCE) == ("within the 1% tolerance by its interval (its upper end, +0.50%, "
                                          "is within it)")
    only = ("within the 1% tolerance by its point estimate only: its interval reaches +1.40%, beyond it; "
            "more windows (-n) narrow the interval")
    assert D.holds(reach, TOLERANCE) == D.point_estimate_only(reach, TOLERANCE) == only
    assert D.holds(one, TOLERANCE) == ("within the 1% tolerance by its point estimate (it has no interval: "
                                       "one window)")
    assert [D.holds(x, TOLERANCE, short=True) for x in (within, reach, beyond)] == [
        "within the 1% tolerance by its interval", "within the 1% tolerance by its point estimate only",
        "beyond the 1% tolerance"]
    assert D.holds(within, None) == "within the tolerance" and D.point_estimate_only(reach, None) is None
    assert [D.how_held(x, TOLERANCE) for x in (within, reach, one, beyond)] == [
        "within, by its interval", "within, by its point estimate only", "within", "beyond"]
    lead = D.lead(reach, TOLERANCE, none_held=False)
    assert lead.kind == "deploy" and D.plain(lead.words).endswith(f"{only}.")
    assert D.Marked("-n", D.CODE) in lead.words  # the option to type, set apart


# -- a single deployment --------------------------------------------------------------------------------

def test_a_run_of_one_scheme_deploys_as_its_exports_say():
    notes = ["ModelOpt: rounds differently", "ModelOpt: floors small scales"]
    assert D.single_deployment({"exports": {"recipe": "recipe.yaml"}}) == ("exact", "llm-compressor")
    assert D.single_deployment({"exports": {"recipe": "r.yaml", "modelopt": "m.yaml"}}) == (
        "exact", "llm-compressor or ModelOpt")
    assert D.single_deployment({"exports": {"modelopt": "m.yaml", "notes": notes}}) == (
        "approximate", "ModelOpt, whose arithmetic differs below the format: " + "; ".join(notes))
    assert D.single_deployment({"exports": {"recipe_note": "why", "modelopt_note": "why"}}) == (None, "why")
    assert D.single_deployment({}) == (None, "no library file was written")


def test_a_single_deployment_is_one_candidate_with_its_held_out_figure(plans):  # noqa: F811
    run = read_run(plans["tight"])
    s = run.summary
    (only,) = D.offers(s, run)
    held, share = s["plan"]["holdout"], s["plan"]["parameter_share"]
    own = weight_bits(TARGETS[s["scheme"]["scheme"].lower()])
    assert only["bits_per_weight"] == pytest.approx(share * 16 + (1 - share) * own)
    assert (only["change_pct"], only["within_tolerance"], only["windows"]) == (
        held["plan"]["change_pct"], held["within_tolerance"], held["windows"]["windows"])
    assert only["deployable"] == D.single_deployment(s)[0] == "exact"
    said = D.deploy_decision(s, run)
    assert said.lead.kind == "failed" and said.runners == [] and said.diagnostics == []
    libraries = [name for name, key in (("llm-compressor", "recipe"), ("ModelOpt", "modelopt"))
                 if s["exports"].get(key)]
    assert D.plain(said.how) == f"How: deployed exactly as measured, by {' or '.join(libraries)}."
    unknown = D.deploy_decision(s | {"exports": {}, "plan": {**s["plan"], "holdout": None}}, None)
    assert unknown.best["deployable"] is None and unknown.how == []  # no file written: not known how
    assert D.plain(unknown.lead.words).startswith("The plan: llm-compressor:W8A8 with")
    assert D.plain(unknown.files[0]).startswith("This plan was not written to a folder: kernelscope advise")


# -- what was not evaluated -----------------------------------------------------------------------------

def test_what_was_not_evaluated_names_each_cheaper_target_and_transform_untried():
    best = offer("w8a8-per-token", bits_per_weight=16.0, kept_layers=2, parameter_share_kept=0.1,
                 deployable="approximate")
    s = advice([best], settings={"groups": ["block"]})
    untried = [D.plain(line) for line in D.untried(s, D.offers(s), D.offers(s)[0])]
    tried = {(t.weights, t.input_activations, t.smoothquant_alpha) for key, t in TARGETS.items()
             if key == "w8a8-per-token"}
    cheaper: dict[tuple, object] = {}  # one target of each arithmetic not tried, the first named
    for t in TARGETS.values():
        arithmetic = (t.weights, t.input_activations, t.smoothquant_alpha)  # smoothing makes another
        if t.input_activations is not None and t.weight_bits < 16.0 and arithmetic not in tried:
            cheaper.setdefault(arithmetic, t)
    head = untried[0]
    shown = sorted(cheaper.values(), key=lambda t: -t.weight_bits)[:D.SHOWN_UNTRIED]
    assert head.startswith("deployment targets with fewer bits per weight than its 16.00, none of them a "
                           "candidate: ")
    assert all(f"{t.label} ({N.bits(t.weight_bits)})" in head for t in shown)
    more = len(cheaper) - D.SHOWN_UNTRIED
    assert (f" and {more} more;" in head) is (more > 0)
    named = {line.split(" ")[1] for line in untried if line.endswith(")") and "transform, which no" in line}
    assert named == {name for name, entry in TRANSFORMS.items() if entry.deployed_by}
    assert untried[-1] == "each layer's own figure: --per-layer plans from them and may keep fewer parameters"
    fewest = min(t.weight_bits for t in TARGETS.values())
    exact = offer("w8a8-per-token", bits_per_weight=fewest)  # nothing cheaper, nothing kept, exact
    assert D.untried(advice([exact]), [exact], exact) == []
    assert len(D.untried(advice([exact]), [exact], exact | {"deployable": "approximate"})) == len(named)


# -- kernels against thresholds -------------------------------------------------------------------------

FAMILY = {"quantizer": "per_token", "bits": 8, "alpha": None, "format": "int8", "block_size": None,
          "label": "per_token int8"}


def kernel(config: str, fraction: float, quantizer: str = "per_token", **fields) -> dict:
    return {"transform": "none", "config": config, "quantizer": quantizer, "bits": 8, "alpha": None,
            "format": "int8", "kernel_fraction": fraction} | fields


def threshold_run(status: str = D.BRACKETED, low: float | None = 0.08, high: float | None = 0.12,
                  sha: str = "text") -> dict:
    kernels = [kernel("per_token int8", 0.05), kernel("crossquant a=0.15 int8", 0.03, "crossquant",
                                                     alpha=0.15)]
    return {"kind": "threshold", "family": FAMILY, "text": {"sha256": sha}, "windows": {"seqlen": 32},
            "searches": [{"transform": "none", "status": status, "threshold_kernel_fraction": 0.1,
                          "crossing_uncertainty": {"kernel_fraction_ci_low": low,
                                                   "kernel_fraction_ci_high": high},
                          "actual_kernels": kernels, "verdicts": ["its own words", "not judged"]}]}


def test_a_kernel_lies_below_within_or_above_the_threshold_of_its_own_family():
    located = D.located_thresholds([("t", threshold_run())])
    assert [(t.value, t.low, t.high, t.basis) for t in located] == [(0.1, 0.08, 0.12, "none")]
    for fraction, where in ((0.07, "below"), (0.08, "within"), (0.12, "within"), (0.2, "above")):
        (said,) = D.against(kernel("per_token int8", fraction), located)
        assert (said.side, said.words) == (where, D.SIDES[where])
        assert said.threshold == "10.00% [8.00%, 12.00%]" and said.source == "t"
    assert D.against(kernel("crossquant a=0.15 int8", 0.01, "crossquant", alpha=0.15), located) == []
    assert D.against(kernel("per_token int8", 0.01, transform="hadamard"), located) == []
    elsewhere = {"text": {"sha256": "other"}, "windows": {"seqlen": 32}}
    assert D.against(kernel("per_token int8", 0.01), located, elsewhere)[0].source == (
        "t, located on other text or windows")
    assert D.against(kernel("per_token int8", 0.01), located, threshold_run())[0].source == "t"
    unsure = D.located_thresholds([("t", threshold_run(low=None, high=None))])
    assert D.against(kernel("per_token int8", 0.1), unsure)[0].side == "within"  # no interval: the point
    assert D.located_thresholds([("t", threshold_run("no crossing within the range"))]) == []


def test_a_search_judges_the_kernels_of_its_family_only():
    summary = threshold_run()
    own, other = D.search_verdicts("t", summary, summary["searches"][0])
    assert own.kernel == "per_token int8 kernel 5.00%" and [a.side for a in own.against] == ["below"]
    assert other.kernel == "crossquant a=0.15 int8 kernel 3.00%" and other.against == []
    legacy = dict(summary["searches"][0], actual_kernels=[])  # an earlier version's: its own words
    assert D.search_verdicts("t", summary, legacy) == [D.KernelVerdict(words="its own words"),
                                                       D.KernelVerdict(words="not judged")]
    unbracketed = threshold_run("no crossing within the range")
    assert D.search_verdicts("t", unbracketed, unbracketed["searches"][0])[0] == D.KernelVerdict(
        words="its own words")


def profile_run(model_type: str, fractions: dict[str, float]) -> RunFolder:
    """A profile of a model of ``model_type`` whose model-level kernels are ``fractions``."""
    level = [kernel(config, f, config.split()[0], bits=int(config[-1]), format=f"int{config[-1]}")
             for config, f in fractions.items()]
    summary = {"kind": "profile", "model": {"model": "tiny", "model_type": model_type},
               "text": {"source": "text.txt", "sha256": "text"}, "windows": {"windows": 2, "seqlen": 32},
               "model_level": level}
    return RunFolder(Path("p"), summary, {})


def test_the_paper_reference_is_shown_only_where_no_threshold_was_located():
    assert (D.family_of({"model_type": "opt"}), D.family_of({"architecture": "Qwen2ForCausalLM"}),
            D.family_of({"model_type": "gpt2"})) == ("OPT", "LLaMA", None)
    assert (D.paper_reference("OPT"), D.paper_reference("LLaMA"), D.paper_reference(None)) == (
        "OPT 19%", "LLaMA 1%", None)
    llama = profile_run("llama", {"per_token int8": 0.11})
    said = [D.plain(w) for w in D.advice_sentences([("p", llama)], [], [], [], [], "LLaMA", llama.summary)]
    assert said[0] == "The model-level kernel (p): per_token int8 11.00%."
    assert said[1] == ("The CrossQuant paper's reference for LLaMA models is 1% (the paper's, not measured "
                       "here: kernelscope threshold tiny -d text.txt -s 32 -n 2 -o runs/threshold locates "
                       "this model's).")
    assert said[2].startswith("With no kernel threshold bracketed on this model, its kernels are not judged "
                              "here: kernelscope eval tiny")
    other = [D.plain(w) for w in D.advice_sentences([("p", llama)], [], [], [], [], None, llama.summary)]
    assert not any("paper's reference" in s for s in other)
    assert other[-1].startswith("With no kernel threshold bracketed on this model, its kernels are not "
                                "judged here: kernelscope threshold tiny")
    located = [D.plain(w) for w in D.advice_sentences([("p", llama)], [("t", threshold_run())], [], [], [],
                                                      "LLaMA", llama.summary)]
    assert ("The kernel threshold located on this model, for its own family and basis only: per_token int8 "
            "10.00% [8.00%, 12.00%].") in located
    assert not any("paper's reference" in s or "not judged" in s for s in located)


# -- 4-bit activations ----------------------------------------------------------------------------------

def test_the_4bit_advice_names_the_best_measured_else_the_smallest_kernel_against_its_threshold():
    rows = [{"scheme": "w4a4-per-token", "mode": "fake_quant", "activation_bits": 4, "perplexity": 12.0,
             "change_pct": 20.0, "weight_bits": 4, "group_size": 128},
            {"scheme": "w4a4-hadamard", "mode": "fake_quant", "activation_bits": 4, "perplexity": 11.0,
             "change_pct": 10.0, "transform": "hadamard"},
            {"scheme": "w4a4-remove", "mode": "remove_kernel", "activation_bits": 4, "perplexity": 10.1,
             "change_pct": 1.0},
            {"scheme": "w8a8-per-token", "mode": "fake_quant", "activation_bits": 8, "perplexity": 10.0,
             "change_pct": 0.5}]
    best = ("4-bit activations: the best evaluated, w4a4-hadamard, hadamard, costs +10.00% with every "
            "layer quantized.")
    assert D.int4([("e", {"results": rows})], [], []) == [best]  # a remove-kernel pass is never the best
    search = threshold_run()
    search["family"] = dict(FAMILY, bits=4, format="int4", label="per_token int4")
    located = D.located_thresholds([("t", search)])
    for fraction, words in ((0.05, "is below"), (0.1, "lies within the interval of"), (0.5, "is above")):
        profile = profile_run("llama", {"per_token int4": fraction, "per_token int8": 0.01})
        (said,) = D.int4([], [("p", profile)], located)
        assert said == (f"4-bit activations: the smallest 4-bit kernel measured, per_token int4, on an INT4 "
                        f"grid, at {N.share(fraction)}, {words} the 10.00% [8.00%, 12.00%] threshold located "
                        "on this model for its family.")
    other = D.located_thresholds([("t", threshold_run())])  # an int8 family's threshold only
    (said,) = D.int4([], [("p", profile_run("llama", {"per_token int4": 0.3}))], other)
    assert said.endswith(": no threshold measured for its family (the one located holds for per_token int8 "
                         "only).")
    assert D.int4([], [("p", profile_run("llama", {"per_token int4": 0.3}))], []) == []  # nothing to judge


# -- the commands ---------------------------------------------------------------------------------------

def test_the_commands_repeat_the_runs_model_text_and_windows():
    s = {"model": {"model": "org/m"}, "text": {"source": "my text.txt"},
         "windows": {"windows": 1, "seqlen": 1, "selection": "random", "seed": 3}}
    assert D.rerun_options(s, "threshold") == ["org/m", "-d", "my text.txt", "-s", "2", "-n", "2",
                                               "--windows", "random", "--seed", "3"]
    assert D.rerun_options(s, "zeroshot") == ["org/m"]
    assert D.next_command(s, "eval") == ("kernelscope eval org/m -d 'my text.txt' -s 2 -n 1 --windows random "
                                         "--seed 3 --scheme fp,w8a8-per-token,w8a8-crossquant -o runs/eval")
    assert D.source_of([{"model": {}}, s]) is s and D.source_of([]) == {}


def test_a_scheme_s_own_smoothing_is_not_given_back_as_a_transform():
    """The commands the report writes name a run's basis without the scheme's own step: SmoothQuant's
    migration strength as --smooth-alpha, a target's own smoothing (ModelOpt's) not at all."""
    assert D.own_basis("w8a8-smoothquant", "smoothquant:0.5+hadamard") == ("hadamard",
                                                                           ["--smooth-alpha", "0.5"])
    assert D.own_basis("modelopt:INT8_SMOOTHQUANT_CFG", "modelopt-smoothquant:1") == ("none", [])
    assert D.own_basis("fp8", "hadamard:64") == ("hadamard:64", [])
