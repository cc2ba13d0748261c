"""The exports against the deploying libraries themselves: every registry format in each role is either
written as arguments the library validates and computes as kernelscope does, or refused where the
library's own code computes something else (its scales compared on blocks chosen to tell the rules
apart); every ModelOpt file loads with ModelOpt's own loader and ``mtq.quantize`` turns on exactly the
quantizers of the layers the plan quantizes; every compressed-tensors argument set round-trips through
``QuantizationArgs``."""

from __future__ import annotations

import pytest
import torch
import yaml

from kernelscope.quant import formats as F
from kernelscope.quant.formats import E2M1, E3M2, FORMATS, ElementGrid, Form, Format, ScaleRule, Unit
from kernelscope.results import exports as X
from kernelscope.runs.schemes import parse_scheme
from tests.conftest import tiny_model

W, A = X.WEIGHTS, X.ACTIVATIONS
LLMC, MO = X.LLM_COMPRESSOR, X.MODEL_OPT
EXPORTED = {
    LLMC: {("fp8_per_token", W), ("fp8_per_token", A), ("fp8_per_tensor", W), ("nvfp4", W)},
    MO: {("per_token", W), ("per_token", A), ("per_tensor", W), ("per_group", W), ("fp8_per_token", W),
         ("fp8_per_token", A), ("fp8_per_tensor", W), ("mxfp4_rceil", W), ("mxfp4_rceil", A), ("nvfp4", W)},
}
"""Which registry formats, in which role, each library computes as kernelscope does."""
MO_SCHEMES = ("w8a8-per-token", "w4a8-g128-per-token", "fp8", "mxfp4-rceil")
"""The schemes of the examples whose ModelOpt file is written."""
KEPT = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]


def registry_format(name: str, bits: int = 8) -> Format:
    entry = FORMATS[name]
    return F.get_format(name, bits=bits if entry.grid is None else None,
                        alpha=0.5 if entry.takes_alpha else None)


def translate(library: str, fmt: Format, role: str):
    return X.TRANSLATORS[library](fmt, role)


def cases():
    return [(lib, name, bits, role) for lib in (LLMC, MO) for name, entry in FORMATS.items()
            for bits in ((8, 4) if entry.grid is None else (None,)) for role in (W, A)]


@pytest.mark.parametrize(("library", "name", "bits", "role"), cases())
def test_every_registry_format_is_exported_exactly_or_refused_with_its_reason(library, name, bits, role):
    fmt = registry_format(name, bits or 8)
    try:
        args, notes = translate(library, fmt, role)
    except X.Refused as exc:
        assert (name, role) not in EXPORTED[library]
        assert name in str(exc)
        return
    assert (name, role) in EXPORTED[library] and all(n.startswith(f"{name}: ") for n in notes)
    assert args and "cfg" not in args and "note" not in args


def test_e2m3_and_e3m2_are_told_apart_by_every_library():
    e2m3, e3m2 = registry_format("mxfp6_e2m3"), registry_format("mxfp6_e3m2")
    for library in (LLMC, MO):
        for role in (W, A):
            reasons = []
            for fmt in (e2m3, e3m2):
                with pytest.raises(X.Refused) as info:
                    translate(library, fmt, role)
                reasons.append(str(info.value))
            assert reasons[0] != reasons[1]
    with pytest.raises(X.Refused, match="6-bit float element is E2M3"):
        translate(LLMC, e3m2, W)
    rceil = [Format(f.name, ScaleRule(Unit.BLOCK, Form.E8M0_RCEIL), f.grid, 32) for f in (e2m3, e3m2)]
    cfgs = [translate(MO, f, W)[0]["num_bits"] for f in rceil]
    assert cfgs == [[2, 3], [3, 2]]


def test_an_e5m2_element_is_never_exported_as_e4m3():
    e5m2 = ElementGrid("e5m2", 8, 57344.0, 2.0**-16, exponent_bits=5, mantissa_bits=2)
    per_token = Format("fp8_e5m2_per_token", ScaleRule(Unit.TOKEN), e5m2)
    for library in (LLMC, MO):
        for role in (W, A):
            with pytest.raises(X.Refused, match="E5M2"):
                translate(library, per_token, role)
    mx = Format("mxfp8_e5m2_rceil", ScaleRule(Unit.BLOCK, Form.E8M0_RCEIL), e5m2, 32)
    assert translate(MO, mx, A)[0]["num_bits"] == [5, 2]


@pytest.mark.parametrize(("scheme", "recipe", "modelopt"), [
    ("w8a8-per-token", None, "max"), ("w4a8-g128-per-token", None, "max"),
    ("fp8", "FP8_DYNAMIC", "FP8_PER_CHANNEL_PER_TOKEN_CFG"), ("mxfp4-rceil", None, "MXFP4_DEFAULT_CFG"),
    ("mxfp4", None, None), ("mxfp8", None, None), ("mxfp6-e3m2", None, None), ("nvfp4", None, None),
    ("w8a8-per-tensor", None, None), ("fp8-per-tensor", None, None),
    ("llm-compressor:W8A8", "W8A8", None), ("llm-compressor:MXFP4", "MXFP4", None)])
def test_schemes_deploy_where_the_library_computes_them(scheme, recipe, modelopt):
    """``recipe``: llm-compressor's preset (None: refused); ``modelopt``: ModelOpt's preset, or the
    algorithm of a config no preset has (None: refused)."""
    d = X.deployment(parse_scheme(scheme))
    assert (d.llmcompressor.preset if d.llmcompressor.ok else None) == recipe
    assert d.llmcompressor.ok == (recipe is not None)
    assert d.modelopt.ok == (modelopt is not None)
    if d.modelopt.ok:
        assert modelopt in (d.modelopt.preset, d.modelopt.algorithm)
    for export in (d.llmcompressor, d.modelopt):
        assert export.ok or export.reason.startswith(f"{export.library} ") or scheme in export.reason


# -- compressed-tensors ---------------------------------------------------------------------------------

def ct_exports() -> list[dict]:
    """Every argument set a recipe can carry: the registry's exported formats and every llm-compressor
    preset a scheme names."""
    from kernelscope.quant.targets import LLM_COMPRESSOR, TARGETS

    found = [translate(LLMC, registry_format(name), role)[0] for name, role in sorted(EXPORTED[LLMC])]
    for target in TARGETS.values():
        if target.library == LLM_COMPRESSOR:
            export = X.deployment(parse_scheme(target.label)).llmcompressor
            found += [a for a in (export.weights, export.input_activations) if a is not None]
    return found


def test_every_recipe_argument_set_round_trips_through_quantization_args():
    ct = pytest.importorskip("compressed_tensors.quantization")
    for args in ct_exports():
        back = ct.QuantizationArgs(**args).model_dump()
        got = {k: str(getattr(back[k], "value", back[k])).removeprefix("torch.") if k == "scale_dtype"
               else getattr(back[k], "value", back[k]) for k in args}
        assert got == args


def ct_fake_quantize(x: torch.Tensor, args: dict, reduce: int | None) -> torch.Tensor:
    """compressed-tensors' own scale (calculate_qparams) and fake quantization of ``x``, one scale per
    row (``reduce`` -1), per tensor (None) or, for NVFP4, per group under its global scale."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    q = ct.QuantizationArgs(**args)
    if q.strategy == "tensor_group":
        glob = generate_gparam(*torch.aminmax(x))
        groups = x.unflatten(-1, (-1, q.group_size))
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), q, global_scale=glob)
        return fake_quantize(x, scale, zero, q, global_scale=glob)
    if reduce is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.amin(reduce, keepdim=True), x.amax(reduce, keepdim=True)
    scale, zero = calculate_qparams(lo, hi, q)
    return fake_quantize(x, scale, zero, q)


def test_compressed_tensors_computes_the_exported_formats_as_kernelscope_does():
    """float32: FP8 per token, per output channel and per weight bit for bit; NVFP4 weights to the same
    codes, with values equal but for the last bit (the note's order of the two scales)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 256, generator=g) * torch.randn(4, 64, 1, generator=g).exp()  # (B, T, I)
    w = torch.randn(96, 256, generator=g) * 0.05  # (O, I)
    for name, role, t, reduce in (("fp8_per_token", A, x, -1), ("fp8_per_token", W, w, -1),
                                  ("fp8_per_tensor", W, w, None)):
        fmt = registry_format(name)
        ours = F.fake_quantize(t, fmt)
        assert torch.equal(ct_fake_quantize(t, translate(LLMC, fmt, role)[0], reduce), ours), (name, role)
    fmt = registry_format("nvfp4")
    theirs = ct_fake_quantize(w, translate(LLMC, fmt, W)[0], None)
    q, s = F.quantize(w, fmt)
    assert torch.equal(E2M1.round(F.quotient(theirs, fmt, s)), q)
    torch.testing.assert_close(theirs, F.dequantize(q, s, fmt), rtol=2**-22, atol=0)


def test_compressed_tensors_int_and_mx_scales_are_not_kernelscope_s():
    """The refusals hold: an INT8 unit's scale is amax / 127.5 (its maximum comes back clipped); the MX
    scale rounds up from a mantissa of 1.75 (1.9375 for E2M3), neither FLOOR nor RCEIL."""
    pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    row = torch.tensor([[1.0, -0.5, 0.25]])
    args = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
    assert ct_fake_quantize(row, args, -1)[0, 0] == 127 * (torch.tensor(1.0) / 127.5) < 1.0
    assert F.fake_quantize(row, registry_format("per_token"))[0, 0] == 1.0
    mantissas = torch.tensor([1.0, 1.5, 1.625, 1.75, 1.875, 1.9, 1.9375, 1.99])
    for name, threshold in (("mxfp4", 1.75), ("mxfp8", 1.75), ("mxfp6_e2m3", 1.9375)):
        fmt = registry_format(name)
        amax = mantissas * 4.0
        theirs = 2.0 ** (generate_mx_scales(amax, fmt.grid.bits) - 127)
        floor = F.scale_of(amax, fmt)
        assert torch.equal(theirs != floor, mantissas >= threshold), name
        rceil = F.scale_of(amax, Format(name, ScaleRule(Unit.BLOCK, Form.E8M0_RCEIL), fmt.grid, 32))
        top = fmt.grid.max_value / 2.0**fmt.grid.emax  # RCEIL rounds up above the max's own mantissa
        assert torch.equal(theirs != rceil, (mantissas >= threshold) != (mantissas > top)), name


# -- ModelOpt ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mtq():
    pytest.importorskip("modelopt.torch.quantization")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def plain(cfg: dict):
    """A ModelOpt quantizer config as ModelOpt validates it (tuples, defaults filled in)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    return QuantizerAttributeConfig(**cfg).model_dump()


def test_modelopt_presets_and_exclusions_are_the_installed_ones(mtq):
    from modelopt.torch.quantization.config import normalize_quant_cfg_list

    for preset in X.MODELOPT_PRESETS:
        theirs = getattr(mtq, preset.name)
        entries = [e.model_dump(exclude_unset=True) for e in normalize_quant_cfg_list(theirs["quant_cfg"])]
        assert entries[0] == {"quantizer_name": "*", "enable": False}
        assert [e["quantizer_name"] for e in entries[1:3]] == ["*weight_quantizer", "*input_quantizer"]
        assert plain(entries[1]["cfg"]) == plain(preset.weights), preset.name
        assert plain(entries[2]["cfg"]) == plain(preset.input_activations), preset.name
        assert entries[3:] == X.modelopt_exclusions() and theirs["algorithm"] == preset.algorithm
    assert mtq.INT8_DEFAULT_CFG["quant_cfg"][3:] == X.modelopt_exclusions()


def test_every_modelopt_quantizer_validates(mtq):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    for name, role in sorted(EXPORTED[MO]):
        for bits in (8, 4) if FORMATS[name].grid is None else (None,):
            cfg, _ = translate(MO, registry_format(name, bits or 8), role)
            assert QuantizerAttributeConfig(**yaml.safe_load(yaml.safe_dump(cfg))).enable


def quantizer(cfg: dict, calibrate: torch.Tensor | None = None):
    """A ModelOpt TensorQuantizer of ``cfg``, its amax calibrated (max) on ``calibrate`` if given."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = TensorQuantizer(QuantizerAttributeConfig(**cfg))
    if calibrate is not None:
        q.disable_quant()
        q.enable_calib()
        q(calibrate)
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()
    return q


MO_ORACLE = [("per_token", 8, A), ("per_token", 4, A), ("per_token", 8, W), ("per_token", 4, W),
             ("per_group", 8, W), ("per_group", 4, W), ("per_tensor", 8, W), ("fp8_per_token", None, A),
             ("fp8_per_token", None, W), ("fp8_per_tensor", None, W)]


@pytest.mark.parametrize(("name", "bits", "role"), MO_ORACLE)
def test_modelopt_computes_the_exported_formats_as_kernelscope_does(mtq, name, bits, role):
    """ModelOpt's own quantizer (CPU, float32): the same codes everywhere; values equal but for the
    last bit (it divides by qmax / amax where kernelscope multiplies by the step)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 64, 256, generator=g) * torch.randn(4, 64, 1, generator=g).exp() if role == A
         else torch.randn(96, 256, generator=g) * 0.05)
    fmt = registry_format(name, bits or 8)
    cfg, _ = translate(MO, fmt, role)
    theirs = quantizer(cfg, None if role == A else x)(x)
    q, s = F.quantize(x, fmt)
    assert torch.equal(fmt.grid.round(F.quotient(theirs, fmt, s)), q)
    torch.testing.assert_close(theirs, F.dequantize(q, s, fmt), rtol=2**-22, atol=0)


def test_modelopt_differs_below_kernelscope_s_scale_floor_as_the_note_says(mtq):
    fmt = registry_format("per_token")
    x = torch.tensor([[[1e-4, 3e-5, -7e-5, 2e-6]]])  # one token whose abs-max is under 127 * 1e-5
    cfg, notes = translate(MO, fmt, A)
    assert any("below 0.00127" in n for n in notes)
    assert torch.equal(quantizer(cfg)(x), x.mul(127 / 1e-4).round().div(127 / 1e-4))  # its own amax
    assert not torch.equal(quantizer(cfg)(x), F.fake_quantize(x, fmt))  # kernelscope's step is 1e-5


def test_modelopt_mx_export_scale_is_rceil_not_floor(mtq):
    """ModelOpt's MX fake quantization needs CUDA; its MXFP4 export (MXFP4QTensor, CPU) has the RCEIL
    scale of mxfp4_rceil on blocks away from a power of two, never mxfp4's FLOOR scale above 1.5."""
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

    mantissas = torch.tensor([1.0, 1.25, 1.5, 1.625, 1.75, 1.99])
    blocks = torch.zeros(len(mantissas), 32)
    blocks[:, 5] = mantissas * 2.0**-3
    _, exponents = MXFP4QTensor.quantize(blocks, 32)
    theirs = 2.0 ** (exponents.float().flatten() - 127)
    amax = blocks.abs().amax(-1)
    assert torch.equal(theirs, F.scale_of(amax, registry_format("mxfp4_rceil")))
    assert torch.equal(theirs != F.scale_of(amax, registry_format("mxfp4")), mantissas > 1.5)


def modelopt_file(scheme: str, model) -> tuple[str, list[str], list[str]]:
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    full = [*KEPT, "lm_head"]
    quantized = [n for n in linear if n not in full]
    export = X.modelopt_for(X.deployment(parse_scheme(scheme)).modelopt, quantized)
    return X.modelopt_yaml(export, quantized, full, ["a header line"]), quantized, full


@pytest.mark.parametrize("scheme", MO_SCHEMES)
def test_modelopt_file_loads_as_written_and_quantizes_exactly_the_plan(mtq, scheme, tmp_path):
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    model = tiny_model("llama")
    text, quantized, _ = modelopt_file(scheme, model)
    body = yaml.safe_load(text)
    assert set(body) == {"quant_cfg", "algorithm"} and isinstance(body["quant_cfg"], list)
    QuantizeConfig.model_validate(body)
    (tmp_path / "cfg.yaml").write_text(text)
    assert isinstance(load_config(tmp_path / "cfg.yaml"), QuantizeConfig)  # its schema line, its loader
    export = X.deployment(parse_scheme(scheme)).modelopt
    model = mtq.quantize(model, yaml.safe_load(text), forward_loop=None)
    on = {n for n, m in model.named_modules() if n.endswith("_quantizer") and m.is_enabled}
    assert on == {f"{n}.{q}" for n in quantized for q in ("weight_quantizer", "input_quantizer")}
    assert any(n.startswith("model.embed_tokens.") for n, _ in model.named_modules())  # its quantizers: off
    layer = dict(model.named_modules())[quantized[0]]
    for q, args in (("weight_quantizer", export.weights), ("input_quantizer", export.input_activations)):
        mine = plain(args)
        got = getattr(layer, q)
        assert got.num_bits == mine["num_bits"]
        assert got.narrow_range == mine["narrow_range"]
    if not export.weights.get("block_sizes", {}).get("scale_bits"):  # MX and NVFP4 need ModelOpt's CUDA
        with torch.no_grad():
            logits = model(input_ids=torch.arange(1, 17).reshape(1, 16)).logits
        assert torch.isfinite(logits).all()


def test_modelopt_keeps_its_exclusions_and_refuses_a_plan_they_would_change():
    export = X.deployment(parse_scheme("fp8")).modelopt
    refused = X.modelopt_for(export, ["model.layers.0.mlp.up_proj", "lm_head"])
    assert not refused.ok and "lm_head" in refused.reason and "model.layers.0" not in refused.reason
    assert X.modelopt_for(export, ["model.layers.0.mlp.up_proj"]).ok
    cfg = X.modelopt_config(export, ["a.b"], ["c.d"])["quant_cfg"]
    assert cfg[3:-1] == X.modelopt_exclusions() and cfg[-1] == {"quantizer_name": "c.d.*", "enable": False}


def test_the_modelopt_file_reads_back_as_the_plan_s_full_precision_layers():
    model = tiny_model("llama")
    text, _, full = modelopt_file("w8a8-per-token", model)
    modules = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = X._from_yaml(text, "f")
    assert spec.resolve(modules) == sorted(full)


def test_e3m2_rceil_is_modelopt_s_mxfp6():
    fmt = Format("e3m2_rceil", ScaleRule(Unit.BLOCK, Form.E8M0_RCEIL), E3M2, 32)
    preset = next(p for p in X.MODELOPT_PRESETS if p.name == "MXFP6_DEFAULT_CFG")
    assert translate(MO, fmt, W)[0] == preset.weights and translate(MO, fmt, A)[0] == preset.input_activations
