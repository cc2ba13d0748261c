"""``eval --sqnr``: each layer's output SQNR against a reference written here (hooks and plain torch)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from kernelscope.models import select_linear_layers
from kernelscope.quant import QuantizerConfig, targets
from kernelscope.quant.transforms import IDENTITY, parse_transform
from kernelscope.results.schema import COLUMNS
from kernelscope.runs.evaluate import evaluate
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.sqnr import SQNR_COLUMNS, SqnrMeasurements, decibels
from tests import reference as ref
from tests.conftest import tiny_model
from tests.test_cli import run_cli
from tests.test_eval import no_hooks, windows_for
from tests.test_trust import assert_refused

# -- the reference -------------------------------------------------------------------------------


def hadamard(n: int) -> torch.Tensor:
    """The normalised Sylvester–Hadamard matrix of order ``n`` (symmetric and orthogonal: H⁻¹ = Hᵀ = H)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def int_activation(seq: torch.Tensor, quantizer: str, bits: int, alpha=None, remove: bool = False):
    """One sequence ``(T, I)`` fake-quantized by the textbook formula (or only its kernel zeroed), and
    how many of its elements round to zero."""
    step = ref.step_for_sequence(seq, quantizer, bits, alpha)
    q = 2 ** (bits - 1) - 1
    codes = torch.round(seq / step)
    zero = codes == 0
    out = torch.where(zero, torch.zeros_like(seq), seq) if remove else torch.clamp(codes, -q, q) * step
    return out, int(zero.sum())


def int_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w (O, I)`` fake-quantized per output channel, symmetric INT."""
    q = 2 ** (bits - 1) - 1
    step = torch.clamp(w.abs().max(dim=1, keepdim=True).values / q, min=1e-5)
    return torch.clamp(torch.round(w / step), -q, q) * step


def reference(model, windows, layers, act, weight, *, basis: bool = False, weights_move: bool = True):
    """Per layer: output energy, error energies (activations, weights, both; None where ``act`` or
    ``weight`` is None) and the kernel, from pre-hooks on the model in full precision, one window a
    forward pass. ``act(seq) -> (seq_q, zeros)``, ``weight(w) -> w_q``. With ``basis``, quantization acts
    on ``x·H`` and ``W·H`` (H Hadamard); a scheme whose weights stay (``weights_move`` False) maps the
    activation back, ``R(x·H)·H``, and keeps ``W``."""
    sums = {layer.name: {"signal": 0.0, "a": 0.0, "w": 0.0, "aw": 0.0, "kernel": 0, "elements": 0}
            for layer in layers}

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            x = x[0] if x.dim() == 3 else x  # (T, I): one window (OPT flattens it before fc1 and fc2)
            w = module.weight.detach()
            if not isinstance(module, torch.nn.Linear):  # GPT-2's Conv1D keeps (I, O)
                w = w.t()
            h = hadamard(x.shape[-1]) if basis else None
            xb = x if h is None or not weights_move else x @ h
            wb = w if h is None or not weights_move else w @ h
            if act is not None:
                xq, zeros = act(x if h is None else x @ h)
                if h is not None and not weights_move:
                    xq = xq @ h
            else:
                xq, zeros = xb, 0
            wq = weight(wb) if weight is not None else wb
            y = x.double() @ w.double().T
            s = sums[name]
            s["signal"] += float(y.square().sum())
            s["a"] += float((y - xq.double() @ wb.double().T).square().sum())
            s["w"] += float((y - xb.double() @ wq.double().T).square().sum())
            s["aw"] += float((y - xq.double() @ wq.double().T).square().sum())
            s["kernel"] += zeros
            s["elements"] += x.numel()
        return hook

    handles = [layer.module.register_forward_pre_hook(hook_for(layer.name)) for layer in layers]
    try:
        with torch.no_grad():
            for row in windows.tokens:
                model(input_ids=row[None])
    finally:
        for h in handles:
            h.remove()
    return sums


def db(signal: float, noise: float) -> float | None:
    return None if noise == 0 else 10 * math.log10(signal / noise)


def measured(model, windows, scheme, layers=None, transform=IDENTITY, calibration=None):
    res = evaluate(model, windows, [parse_scheme("fp"), scheme], layers=layers, transforms=[transform],
                   calibration=calibration, sqnr=True)
    return res, {r["layer"]: r for r in res.sqnr.to_dicts()}


def assert_matches(rows, sums, *, activations=True, weights=True, tol=1e-6):
    assert set(rows) == set(sums)
    for name, s in sums.items():
        r = rows[name]
        assert r["sqnr_db"] == pytest.approx(db(s["signal"], s["aw"]), abs=tol), name
        if activations:
            assert r["sqnr_activations_db"] == pytest.approx(db(s["signal"], s["a"]), abs=tol), name
            assert r["kernel_elements"] == s["kernel"] and r["elements"] == s["elements"], name
        else:
            assert r["sqnr_activations_db"] is None and r["kernel_fraction"] is None, name
        if weights:
            assert r["sqnr_weights_db"] == pytest.approx(db(s["signal"], s["w"]), abs=tol), name
        else:
            assert r["sqnr_weights_db"] is None, name


# -- every layer against the reference -----------------------------------------------------------

INT_SCHEMES = {
    "w8a8-per-token": (lambda s: int_activation(s, "per_token", 8), lambda w: int_weight(w, 8)),
    "w4a4-per-token": (lambda s: int_activation(s, "per_token", 4), lambda w: int_weight(w, 4)),
    "w8a8-crossquant": (lambda s: int_activation(s, "crossquant", 8, 0.15), lambda w: int_weight(w, 8)),
    "remove-kernel-per-token": (lambda s: int_activation(s, "per_token", 8, remove=True), None),
}


@pytest.mark.parametrize("name", list(INT_SCHEMES))
def test_every_layer_s_sqnr_equals_the_reference(name):
    model = tiny_model("llama")
    windows = windows_for()
    layers = select_linear_layers(model)
    act, weight = INT_SCHEMES[name]
    sums = reference(model, windows, layers, act, weight)
    res, rows = measured(model, windows, parse_scheme(name))
    assert_matches(rows, sums, weights=weight is not None)
    assert res.sqnr.height == len(layers) and set(res.sqnr["scheme"]) == {name}
    # the model's figure pools every layer's energies: the output-energy-weighted mean of their noise ratios
    (level,) = res.summary["sqnr"]["results"]
    total = sum(s["signal"] for s in sums.values())
    assert level["sqnr_db"] == pytest.approx(db(total, sum(s["aw"] for s in sums.values())), abs=1e-6)
    down = [s for layer, s in zip(layers, sums.values(), strict=True) if layer.module_type == "down_proj"]
    (kind,) = [g for g in level["by_module_type"] if g["module_type"] == "down_proj"]
    assert kind["sqnr_db"] == pytest.approx(db(sum(s["signal"] for s in down), sum(s["aw"] for s in down)),
                                            abs=1e-6)
    assert level["kernel_fraction"] == (sum(s["kernel"] for s in sums.values())
                                        / sum(s["elements"] for s in sums.values()))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_conv1d_and_biased_layers(family, monkeypatch):
    # GPT-2's Conv1D stores its weight (I, O); OPT's layers have a bias, left out of y = x·Wᵀ. A small
    # chunk makes the pass take a few tokens at a time, which changes no sum beyond float64 rounding.
    model = tiny_model(family)
    windows = windows_for()
    layers = select_linear_layers(model)
    act, weight = INT_SCHEMES["w8a8-per-token"]
    sums = reference(model, windows, layers, act, weight)
    _, rows = measured(model, windows, parse_scheme("w8a8-per-token"))
    assert_matches(rows, sums)
    monkeypatch.setattr("kernelscope.runs.sqnr.CHUNK", 100)
    _, chunked = measured(model, windows, parse_scheme("w8a8-per-token"))
    assert_matches(chunked, sums)


@pytest.mark.parametrize("name", ["w8a8-per-token", "remove-kernel-per-token"])
def test_a_transform_quantizes_in_its_basis(name):
    # Hadamard on widths 32 and 64 (one block each): w8a8 quantizes x·H and W·H; remove-kernel zeroes the
    # kernel of x·H, maps it back (·H) and keeps W.
    model = tiny_model("llama")
    windows = windows_for()
    layers = select_linear_layers(model)
    act, weight = INT_SCHEMES[name]
    sums = reference(model, windows, layers, act, weight, basis=True, weights_move=weight is not None)
    res, rows = measured(model, windows, parse_scheme(name), transform=parse_transform("hadamard"))
    assert set(res.sqnr["transform"]) == {"hadamard"}
    assert_matches(rows, sums, weights=weight is not None)
    plain = reference(model, windows, layers, act, weight)  # the basis matters: the test tells them apart
    moved = [abs(db(s["signal"], s["aw"]) - db(p["signal"], p["aw"])) for s, p in
             zip(sums.values(), plain.values(), strict=True)]
    assert max(moved) > 1


def test_a_weight_only_target_has_no_activation_sqnr():
    # NVFP4A16 quantizes weights in groups of 16 (the tiny model's widths 32 and 64 divide): its
    # arithmetic is checked against the library in test_targets; here, that the SQNR uses it.
    model = tiny_model("llama")
    windows = windows_for()
    scheme = parse_scheme("llm-compressor:NVFP4A16")
    layers = select_linear_layers(model)
    weights = {layer.name: layer.module.weight.detach() for layer in layers}

    def joint(name):  # q/k/v and gate/up share one global scale, as llm-compressor gives them
        parent, _, own = name.rpartition(".")
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            members = [weights.get(f"{parent}.{m}") for m in group]
            if own in group and all(w is not None for w in members):
                return min(float(w.min()) for w in members), max(float(w.max()) for w in members)
        return None

    quantized = {}
    for name, w in weights.items():
        lo_hi = joint(name)
        lo_hi = None if lo_hi is None else (torch.tensor(lo_hi[0]), torch.tensor(lo_hi[1]))
        quantized[w.data_ptr()] = targets.quantize_weight(w, scheme.target.weights, lo_hi)[0]
    assert any(joint(n) for n in weights)
    sums = reference(model, windows, layers, None, lambda w: quantized[w.data_ptr()])
    res, rows = measured(model, windows, scheme)
    assert_matches(rows, sums, activations=False)
    assert all(r["sqnr_db"] == r["sqnr_weights_db"] for r in rows.values())
    (level,) = res.summary["sqnr"]["results"]
    assert level["sqnr_activations_db"] is None and level["kernel_fraction"] is None
    assert level["activations"] is False and level["weights"] is True


def test_a_quantizer_that_leaves_x_unchanged_gives_an_exact_output():
    # λ = 0 removes only exact zeros: every input is unchanged, so every output is exact (infinite SQNR)
    model = tiny_model("llama")
    windows = windows_for()
    nothing = Scheme("remove-kernel λ=0", "remove_kernel", QuantizerConfig("per_token", 8), kernel_scale=0.0)
    res, rows = measured(model, windows, nothing)
    assert all(r["sqnr_db"] is None and r["sqnr_activations_db"] is None and r["sqnr_weights_db"] is None
               for r in rows.values())
    assert all(r["kernel_elements"] == 0 and r["tokens"] == 96 for r in rows.values())
    (level,) = res.summary["sqnr"]["results"]
    assert level["sqnr_db"] is None and level["exact_layers"] == len(rows)
    assert decibels(2.0, 0.0) is None and decibels(100.0, 1.0) == 20.0


@pytest.mark.parametrize("name", ["w8a8-per-token", "remove-kernel-crossquant", "llm-compressor:W8A8",
                                  "llm-compressor:NVFP4"])
def test_the_kernel_equals_eval_s_on_the_first_layers(name):
    # Only block 0's q/k/v quantized: their input is the fp input in eval's pass too, so the kernel the
    # SQNR pass counts is eval's, a target's calibrated scale included (NVFP4: a static global scale).
    model = tiny_model("llama")
    layers = [layer for layer in select_linear_layers(model)
              if layer.block == 0 and layer.module_type in ("q_proj", "k_proj", "v_proj")]
    res, rows = measured(model, windows_for(), parse_scheme(name), layers=layers,
                         calibration=windows_for(seed=5))
    row = res.table.filter(pl.col("scheme") == parse_scheme(name).name).to_dicts()[0]
    assert sum(r["kernel_elements"] for r in rows.values()) == row["kernel_elements"] > 0
    assert res.summary["sqnr"]["results"][0]["kernel_fraction"] == row["kernel_fraction"]


def test_the_model_is_left_as_it_was():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: p.data_ptr() for k, p in model.named_parameters()}
    layers = select_linear_layers(model)
    measured(model, windows_for(), parse_scheme("w4a4-crossquant"), transform=parse_transform("hadamard"))
    assert no_hooks(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.data_ptr() == pointers[k] for k, p in model.named_parameters())

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layers[5].module.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        SqnrMeasurements().measure(model, windows_for(), parse_scheme("w8a8-per-token"), layers)
    handle.remove()
    assert no_hooks(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_without_sqnr_nothing_is_measured_and_fp_alone_is_refused():
    model = tiny_model("llama")
    res = evaluate(model, windows_for(), [parse_scheme("fp"), parse_scheme("w8a8-per-token")])
    assert res.sqnr is None and res.summary["sqnr"] is None
    with pytest.raises(ValueError, match="fp quantizes nothing"):
        evaluate(model, windows_for(), [parse_scheme("fp")], sqnr=True)


# -- the command ----------------------------------------------------------------------------------


def test_eval_sqnr_writes_the_table(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "ev"
    code, stdout, stderr = run_cli(
        capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "64",
        "--scheme", "fp,w8a8-per-token,remove-kernel-per-token", "--sqnr", "-o", str(out))
    assert code == 0, stderr
    assert "Layer output SQNR" in stdout and "down_proj" in stdout and "all 14 layers" in stdout
    table = pl.read_parquet(out / "sqnr.parquet")
    assert table.columns == list(SQNR_COLUMNS)
    assert all(table.schema[c] == COLUMNS[c].dtype for c in table.columns)
    assert table.height == 2 * 14 and table["scheme"].unique(maintain_order=True).to_list() == [
        "w8a8-per-token", "remove-kernel-per-token"]
    assert table["tokens"].to_list() == [2 * 64] * 28
    removed = table.filter(pl.col("scheme") == "remove-kernel-per-token")
    assert removed["sqnr_weights_db"].is_null().all() and removed["sqnr_db"].is_finite().all()
    body = json.loads((out / "summary.json").read_text())
    assert [p["scheme"] for p in body["sqnr"]["results"]] == ["w8a8-per-token", "remove-kernel-per-token"]
    assert "output energy" in body["sqnr"]["weighting"] and "null" in body["sqnr"]["nulls"]


def test_eval_sqnr_with_fp_alone_is_refused(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "1", "-s", "64",
                            "--scheme", "fp", "--sqnr", "-o", str(tmp_path / "ev")],
                   "--sqnr measures the error of a quantizing scheme; fp quantizes nothing", tmp_path)
