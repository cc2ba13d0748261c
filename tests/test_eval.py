"""Evaluation schemes, their identities, the threshold search and the α sweep."""

from __future__ import annotations

import math

import pytest
import torch

from kernelscope.data import make_windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import select_linear_layers
from kernelscope.quant import QuantizerConfig
from kernelscope.runs import profile
from kernelscope.runs.evaluate import evaluate, run_scheme
from kernelscope.runs.fakequant import SchemeApplied
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.sweep import alpha_sweep
from kernelscope.runs.threshold import bracket_crossing, threshold_search
from tests import reference as ref
from tests.conftest import tiny_model


def windows_for(n: int = 3, seqlen: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return make_windows(torch.randint(1, 500, (n * seqlen,), generator=g), seqlen, n)


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# -- scheme names -------------------------------------------------------------------------------

def test_scheme_names():
    s = parse_scheme("w4a8-g128-crossquant", alpha=0.3)
    assert ((s.mode, s.weight_bits, s.group_size, s.activation.bits, s.activation.alpha)
            == ("fake_quant", 4, 128, 8, 0.3))
    s = parse_scheme("w8a8-smoothquant", smooth_alpha=0.6)
    assert s.activation.quantizer == "per_token" and s.transform.label == "smoothquant:0.6"
    s = parse_scheme("remove-kernel-crossquant", bits=4, weight_bits=8)
    assert (s.mode, s.activation.bits, s.weight_bits) == ("remove_kernel", 4, 8)
    assert parse_scheme("FP").mode == "fp"


@pytest.mark.parametrize("bad", ["w8a8", "w8a8-per-row", "int8", "w9a8-per-token", "w8a1-crossquant",
                                 "remove-kernel", "remove-kernel-smoothquant", ""])
def test_unknown_schemes_are_refused(bad):
    with pytest.raises(KernelscopeError):
        parse_scheme(bad)


# -- the fake-quantized forward against a naive one -----------------------------------------------

def hooked_nll(model, windows, handles, originals) -> float:
    """Per-token NLL over ``windows`` with the hooks and swapped weights a reference set up, which are
    undone afterwards (hooks removed, ``originals`` put back)."""
    total = 0.0
    try:
        with torch.no_grad():
            for row in windows.tokens:
                logits = model(input_ids=row[None]).logits[0, :-1]
                total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
    finally:
        for h in handles:
            h.remove()
        for name, module in model.named_modules():
            if name in originals:
                module.weight.data = originals[name]
    return total / (len(windows) * (windows.seqlen - 1))


def naive_nll(model, windows, act_quantizer: str | None, bits: int = 8, alpha=None,
              weight_bits=None) -> float:
    """Per-window NLL with hooks written here: activations and weights fake-quantized by formula."""
    names = {layer.name for layer in select_linear_layers(model)}
    originals = {}
    handles = []
    for name, module in model.named_modules():
        if name not in names:
            continue
        if weight_bits is not None:
            w = module.weight.data
            conv1d = not isinstance(module, torch.nn.Linear)  # GPT-2 keeps (in, out)
            w_oi = w.t() if conv1d else w
            qmax = 2 ** (weight_bits - 1) - 1
            step = torch.clamp(w_oi.abs().max(dim=1, keepdim=True).values / qmax, min=1e-5)
            wq = torch.clamp(torch.round(w_oi / step), -qmax, qmax) * step
            originals[name] = w
            module.weight.data = wq.t().contiguous() if conv1d else wq
        if act_quantizer is not None:
            def pre(mod, args):
                x = args[0]
                seqs = x if x.dim() == 3 else x[None]  # one window a call: a 2-D input is one sequence
                out = torch.empty_like(seqs)
                for b in range(seqs.shape[0]):
                    step = ref.step_for_sequence(seqs[b], act_quantizer, bits, alpha)
                    q = 2 ** (bits - 1) - 1
                    out[b] = torch.clamp(torch.round(seqs[b] / step), -q, q) * step
                return (out.reshape(x.shape),)
            handles.append(module.register_forward_pre_hook(pre))
    return hooked_nll(model, windows, handles, originals)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_w8a8_perplexity_matches_naive_reference(family):
    model = tiny_model(family)
    windows = windows_for()
    layers = select_linear_layers(model)
    for scheme, quantizer, alpha in (("fp", None, None), ("w8a8-per-token", "per_token", None),
                                     ("w8a8-crossquant", "crossquant", 0.15),
                                     ("w4a4-per-token", "per_token", None)):
        got = run_scheme(model, windows, parse_scheme(scheme), layers)
        bits = 4 if scheme.startswith("w4a4") else 8
        expect = naive_nll(model, windows, quantizer, bits, alpha, None if quantizer is None else bits)
        assert got["nll"] == pytest.approx(expect, rel=1e-6, abs=1e-6), scheme
        assert got["perplexity"] == pytest.approx(math.exp(expect), rel=1e-6)
    assert no_hooks(model)


def test_remove_kernel_with_empty_kernel_equals_fp_exactly():
    model = tiny_model("llama")
    windows = windows_for()
    layers = select_linear_layers(model)
    fp = run_scheme(model, windows, parse_scheme("fp"), layers)
    empty = Scheme("remove-kernel λ=0", "remove_kernel", QuantizerConfig("per_token", 8), kernel_scale=0.0)
    got = run_scheme(model, windows, empty, layers)
    assert got["nll"] == fp["nll"] and got["perplexity"] == fp["perplexity"]
    assert got["kernel_elements"] == 0


def test_crossquant_alpha_one_equals_per_token_exactly():
    model = tiny_model("qwen2")
    windows = windows_for()
    layers = select_linear_layers(model)
    for per_token, cross in (("w8a8-per-token", "w8a8-crossquant"),
                             ("remove-kernel-per-token", "remove-kernel-crossquant")):
        a = run_scheme(model, windows, parse_scheme(per_token), layers)
        b = run_scheme(model, windows, parse_scheme(cross, alpha=1.0), layers)
        assert a["nll"] == b["nll"] and a["kernel_elements"] == b["kernel_elements"]


def test_remove_kernel_count_matches_profile_on_first_layer_input():
    # With only layer 0's q/k/v changed, their input is the fp input: counts equal the profile's.
    model = tiny_model("llama")
    windows = windows_for()
    layers = [layer for layer in select_linear_layers(model)
              if layer.block == 0 and layer.module_type in ("q_proj", "k_proj", "v_proj")]
    got = run_scheme(model, windows, parse_scheme("remove-kernel-per-token"), layers)
    prof = profile(model, windows, [QuantizerConfig("per_token", 8)], layers=layers)
    assert got["kernel_elements"] == prof.model_level["kernel_elements"][0]


def test_model_restored_even_when_the_forward_fails():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = select_linear_layers(model)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layers[5].module.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_scheme(model, windows_for(), parse_scheme("w4a8-g128-crossquant"), layers)
    handle.remove()
    assert no_hooks(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.data_ptr() == model.state_dict()[k].data_ptr() for k, p in model.named_parameters())


def test_smoothquant_needs_calibration_and_evaluates():
    model = tiny_model("opt")
    windows = windows_for()
    with pytest.raises(ValueError, match="calibration"):
        evaluate(model, windows, [parse_scheme("w8a8-smoothquant")])
    res = evaluate(model, windows, [parse_scheme("fp"), parse_scheme("w8a8-smoothquant")],
                   calibration=windows_for(seed=5))
    assert res.table["scheme"].to_list() == ["fp", "w8a8-smoothquant"]
    assert res.summary["calibration"]["windows"]["windows"] == 3
    assert math.isfinite(res.table["perplexity"][1])


def test_shared_input_transform_is_counted_for_each_layer():
    model = tiny_model("llama")
    layers = select_linear_layers(model)
    scheme = parse_scheme("w8a8-per-token")
    applied = SchemeApplied(layers, scheme)
    with applied:
        model(input_ids=windows_for(n=1).tokens)
    # every Linear input counted once: elements = sum over layers of T x I
    expect = sum(32 * layer.in_features for layer in layers)
    assert int(applied.elements) == expect


# -- threshold ------------------------------------------------------------------------------------

def test_bracket_on_a_monotone_curve():
    seen = []

    def within(lam):
        seen.append(lam)
        return lam <= 5.3

    lo, hi = bracket_crossing(within, 254.0, 8)
    assert lo <= 5.3 < hi and hi / lo < 1.01
    assert seen[:4] == [1.0, 2.0, 4.0, 8.0]


def test_bracket_when_the_curve_never_crosses_or_crosses_at_once():
    assert bracket_crossing(lambda lam: True, 254.0, 5) == (254.0, None)
    lo, hi = bracket_crossing(lambda lam: False, 254.0, 5, lam_min=2.0**-4)
    assert lo is None and hi == 2.0**-4
    lo, hi = bracket_crossing(lambda lam: lam < 0.3, 254.0, 3)
    assert lo < 0.3 <= hi


def test_bracket_reports_the_observed_crossing_on_a_non_monotone_curve():
    # within below 3, beyond in [3, 6), within again in [6, 20), beyond from 20 on
    def within(lam):
        return lam < 3 or 6 <= lam < 20

    lo, hi = bracket_crossing(within, 254.0, 6)
    assert within(lo) and not within(hi) and lo < hi
    assert 2 <= lo < 3 <= hi <= 4  # doubling saw 2 within and 4 beyond; the later band is never seen


def test_threshold_search_end_to_end():
    model = tiny_model("llama")
    res = threshold_search(model, windows_for(), tolerance=0.002, steps=3)
    s = {**res.summary, **res.summary["searches"][0]}
    assert s["transform"] == "none" and len(res.summary["searches"]) == 1
    assert s["status"] in ("crossing bracketed", "never crossed")
    curve = res.curve
    assert curve["kernel_fraction"].is_sorted()
    if s["status"] == "crossing bracketed":
        assert (s["bracket"]["within"]["perplexity"] <= s["target_perplexity"]
                < s["bracket"]["beyond"]["perplexity"])
        assert s["threshold_kernel_fraction"] == s["bracket"]["within"]["kernel_fraction"]
    assert len(s["verdicts"]) == 4 and all("kernel" in v for v in s["verdicts"])
    # a threshold judges only the kernel of its own family (per-token INT8 here), never CrossQuant's
    judged = [v for v in s["verdicts"] if "not judged" not in v]
    assert len(judged) == 1 and judged[0].startswith("per_token int8 kernel")
    assert all("per_token int8 family's" in v for v in s["verdicts"] if v not in judged)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="at least 2 windows"):
        threshold_search(model, windows_for(n=1))
    with pytest.raises(ValueError, match="tolerance"):
        threshold_search(model, windows_for(), tolerance=0.0)


# -- sweep ----------------------------------------------------------------------------------------

def test_sweep_alpha_one_reproduces_per_token():
    model = tiny_model("mistral")
    windows = windows_for()
    res = alpha_sweep(model, windows, [0.15, 1.0])
    rows = {r["alpha"]: r for r in res.table.to_dicts()}
    pt = run_scheme(model, windows, parse_scheme("w8a8-per-token"), select_linear_layers(model))
    assert rows[1.0]["perplexity"] == pt["perplexity"]
    assert rows[1.0]["kernel_fraction"] == pt["kernel_fraction"]  # the kernel of the row's own pass
    prof = profile(model, windows, [QuantizerConfig("per_token", 8)])
    assert rows[1.0]["fp_kernel_fraction"] == prof.model_level["kernel_fraction"][0]
    assert rows[None]["scheme"] == "fp"


def test_flattened_inputs_are_split_into_sequences_in_a_batch():
    # OPT's fc1/fc2 see (B·T, I): with two windows a batch, each window keeps its own c_j.
    model = tiny_model("opt")
    windows = windows_for(n=2)
    layers = select_linear_layers(model)
    one = run_scheme(model, windows, parse_scheme("w8a8-crossquant"), layers, batch_size=1)
    two = run_scheme(model, windows, parse_scheme("w8a8-crossquant"), layers, batch_size=2)
    assert one["kernel_elements"] == two["kernel_elements"]
    assert one["nll"] == pytest.approx(two["nll"], rel=1e-5)


def test_nan_logits_are_flagged_not_reported_as_a_measurement():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    row = evaluate(model, windows_for(), [parse_scheme("fp")]).table.row(0, named=True)
    assert row["finite"] is False and math.isnan(row["perplexity"])
    healthy = evaluate(tiny_model("llama"), windows_for(), [parse_scheme("fp")]).table.row(0, named=True)
    assert healthy["finite"] is True and math.isfinite(healthy["perplexity"])


def format_nll(model, windows, fmt, *, weights: bool, remove: bool = False) -> float:
    """Per-token NLL with the float format applied here: weights as (O, I) and every sequence's
    activation through ``formats.fake_quantize`` (or its kernel zeroed)."""
    from kernelscope.quant import formats as F

    names = {layer.name for layer in select_linear_layers(model)}
    originals, handles = {}, []
    for name, module in model.named_modules():
        if name not in names:
            continue
        if weights:
            conv1d = not isinstance(module, torch.nn.Linear)
            w = module.weight.data
            wq = F.fake_quantize(w.t() if conv1d else w, fmt)
            originals[name] = w
            module.weight.data = wq.t().contiguous() if conv1d else wq

        def pre(mod, args):
            x = args[0]
            seqs = x if x.dim() == 3 else x[None]
            out = torch.stack([torch.where(F.kernel_mask(s, fmt), 0.0, s) if remove
                               else F.fake_quantize(s, fmt) for s in seqs])
            return (out.reshape(x.shape),)

        handles.append(module.register_forward_pre_hook(pre))
    return hooked_nll(model, windows, handles, originals)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float_format_schemes_match_a_reference_written_here(family):
    model = tiny_model(family)
    windows = windows_for()
    layers = select_linear_layers(model)
    from kernelscope.quant.formats import FORMATS
    from kernelscope.runs.schemes import FLOAT_SCHEMES

    assert {"fp8", "mxfp8", "mxfp4", "mxfp4-rceil", "nvfp4"} <= set(FLOAT_SCHEMES)
    for name, quantizer in FLOAT_SCHEMES.items():  # every float format of the registry
        fmt = QuantizerConfig(quantizer, FORMATS[quantizer].grid.bits).format
        got = run_scheme(model, windows, parse_scheme(name), layers)
        assert got["nll"] == pytest.approx(format_nll(model, windows, fmt, weights=True), rel=1e-6), name
        removal = parse_scheme("remove-kernel-" + quantizer.replace("_", "-"))
        removed = run_scheme(model, windows, removal, layers)
        assert removed["nll"] == pytest.approx(format_nll(model, windows, fmt, weights=False, remove=True),
                                               rel=1e-6), name
    assert no_hooks(model)


def test_threshold_family_can_be_any_format():
    model = tiny_model("llama")
    windows = windows_for()
    family = QuantizerConfig("mxfp4", 4)
    res = threshold_search(model, windows, family=family, tolerance=0.01, steps=1)
    assert res.summary["family"]["label"] == "mxfp4" and family.saturation_scale == 24.0
    at_one = res.curve.filter(res.curve["lambda"] == 1.0)
    removed = run_scheme(model, windows, parse_scheme("remove-kernel-mxfp4"), select_linear_layers(model))
    assert at_one["kernel_fraction"][0] == removed["kernel_fraction"]
    assert at_one["perplexity"][0] == pytest.approx(removed["perplexity"], rel=1e-12)
    assert QuantizerConfig("per_token", 8).saturation_scale == 254.0  # 2·qmax, as before
