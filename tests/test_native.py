"""The C count and the C fake quantization against their definitions in the torch code, for every
format of the registry, at the places where a single rounding decides: elements exactly at the zero
bound and one float either side, at the top of the subnormal codes, in all-zero and partial blocks,
beside NaN and ±Inf, below float32's normal range, in bfloat16."""

from __future__ import annotations

import logging
import math
import shutil
import struct
import subprocess

import pytest
import torch

from kernelscope import element
from kernelscope.element import native
from kernelscope.quant import QuantizerConfig, crossquant_factors, expand_configs
from kernelscope.quant import formats as F
from kernelscope.stats.histogram import HISTOGRAM
from kernelscope.stats.measure import measure

BUILDS = {path.name: path for path in native.candidates()}
"""Every comparison runs on each library that setup.py built and this CPU runs: on x86-64 the
AVX-512 and AVX2 builds and the baseline one, whose loops are different code."""


@pytest.fixture(scope="module", params=list(BUILDS) or [None])
def build(request):
    if request.param is None:
        pytest.skip(f"no native library is installed here ({native.failure or 'none was built'})")
    return native.load(BUILDS[request.param])


@pytest.fixture
def with_build(build, monkeypatch):
    """The library every call below takes (the counts, the histogram, the fake quantization)."""
    monkeypatch.setattr(native, "_library", build)
    monkeypatch.setattr(native, "_tried", True)


on_each_build = pytest.mark.usefixtures("with_build")


@pytest.fixture
def fresh(monkeypatch):
    """The loader as at start-up, and as it was again after the test."""
    native.reset()
    yield
    monkeypatch.undo()
    native.reset()


def no_compiler(*args, **kwargs):
    raise AssertionError(f"a compiler or another program was run: {args}")


def test_the_installed_library_loads_without_running_a_compiler(monkeypatch, fresh):
    """Where a C compiler is found, the package was built with one, so its library must be there;
    loading it runs nothing (the build belongs to the install)."""
    if not BUILDS:
        assert not any(shutil.which(c) for c in ("cc", "gcc", "clang")), (
            f"a C compiler is found here, yet no native library was built: {native.failure}")
        pytest.skip("no C compiler, and no native library: the torch path is tested elsewhere")
    for name in ("run", "Popen", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, no_compiler)
    monkeypatch.setattr(shutil, "which", no_compiler)
    lib = native.library()
    assert lib is not None, native.failure
    assert native.failure is None and lib._name == str(native.candidates()[0])
    assert native.built_with and native.built_with == lib.ks_build_flags().decode()
    assert element.describe().startswith(f"native ({native.built_with}, ")


def test_a_missing_library_gives_the_torch_path_and_says_why(monkeypatch, tmp_path, fresh, caplog):
    x = base_input(4)
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    want = counted(x, CONFIGS[:12])
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)  # nothing there
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.library() is None and native.library() is None
    assert native.failure.startswith(f"no native library for this CPU in {tmp_path}")
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # once, and no warning
    assert element.describe() == f"torch (native library unavailable: {native.failure})"
    assert element._native_input(x) is None
    assert_same(counted(x, CONFIGS[:12]), want)


@pytest.mark.skipif(not BUILDS, reason="no native library is installed here")
def test_a_library_of_another_source_or_that_cannot_load_is_refused(monkeypatch, tmp_path, fresh, caplog):
    """A library built before native.c changed is refused with the advice to rebuild, as is a file
    that is no library; either leaves the torch path, with a warning."""
    edited = tmp_path / "native.c"
    edited.write_bytes(native.SOURCE.read_bytes() + b"\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.library() is None
    assert "built from another native.c" in native.failure and "reinstall" in native.failure
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    native.reset()
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)
    (tmp_path / f"_native{native.SUFFIX}").write_text("not a shared library")
    assert native.library() is None and native.failure.startswith(f"_native{native.SUFFIX} cannot be used")


def test_the_highest_level_this_cpu_runs_comes_first(monkeypatch, tmp_path):
    """The AVX-512 build only where the CPU has every AVX-512 feature x86-64-v4 uses, the AVX2 one
    only with all of x86-64-v3's, the plain build always (last)."""
    for name in ("_native.x86-64-v4", "_native.x86-64-v3", "_native"):
        (tmp_path / f"{name}{native.SUFFIX}").write_bytes(b"")
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "cx16", "lahf_lm", "popcnt",
          "pni", "sse4_1", "sse4_2", "ssse3"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    cases = [(v4 | {"sha_ni"}, ["_native.x86-64-v4", "_native.x86-64-v3", "_native"]),
             (v4 - {"avx512cd"}, ["_native.x86-64-v3", "_native"]),
             (v3, ["_native.x86-64-v3", "_native"]),
             (v3 - {"bmi2"}, ["_native"]),
             (set(), ["_native"])]
    for flags, want in cases:
        monkeypatch.setattr(native, "_cpu_flags", lambda flags=flags: flags)
        assert [p.name for p in native.candidates()] == [f"{n}{native.SUFFIX}" for n in want], sorted(flags)
    (tmp_path / f"_native{native.SUFFIX}").unlink()
    assert [p.name for p in native.candidates()] == []


NAMES = list(F.FORMATS)
CONFIGS = expand_configs(NAMES, [8, 4], [0.15, 0.5, 0.0, 1.0], group_size=24)  # 24: not a multiple of 16
CONFIGS += [QuantizerConfig("per_group", 4, block_size=128), QuantizerConfig("per_group", 8, block_size=7)]


def unit_maxima(x: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """The abs-max every element's scale depends on, at its position: its row's, its column's (for
    per-channel and CrossQuant), its block's and its sequence's."""
    a = x.float().abs()
    t, c = a.amax(-1, keepdim=True), a.amax(-2, keepdim=True)  # (B, T, 1), (B, 1, I)
    out = torch.minimum(t, c).expand_as(a)
    if fmt.is_block:
        out = torch.minimum(out, F.expand_scale(F.unit_amax(a, fmt), fmt, a.shape[-1]))
    return out


def at_the_thresholds(x: torch.Tensor, fmt: F.Format, seed: int) -> torch.Tensor:
    """``x`` with about a fifth of its elements moved onto the thresholds of their own scale (the zero
    bound τ·s, and for a float grid the top of the subnormal codes), exactly or one float either side;
    only elements far below every maximum are moved, so no scale changes."""
    g = torch.Generator().manual_seed(seed)
    s = F.expand_scale(F.scale(x, fmt), fmt, x.shape[-1]).expand(x.shape).float()  # (B, T, I)
    s = torch.where(s == 0, 1.0, s)
    marks = [fmt.tau * s]
    if fmt.grid.subnormal_range is not None:
        marks.append(fmt.grid.subnormal_range[1] * s)
    mark = torch.stack(marks)[torch.randint(len(marks), x.shape, generator=g), *torch.meshgrid(
        *(torch.arange(n) for n in x.shape), indexing="ij")]
    nudge = torch.randint(-1, 2, x.shape, generator=g)
    mark = torch.where(nudge < 0, torch.nextafter(mark, torch.zeros_like(mark)),
                       torch.where(nudge > 0, torch.nextafter(mark, torch.full_like(mark, 1e30)), mark))
    maxima = unit_maxima(x, fmt)
    pick = ((torch.rand(x.shape, generator=g) < 0.2) & (mark < 0.25 * maxima)
            & (x.float().abs() < 0.5 * maxima))
    moved = torch.where(pick, torch.where(x < 0, -mark, mark), x.float()).to(x.dtype)
    assert torch.equal(F.scale(moved, fmt), F.scale(x, fmt))  # the scales are those of x
    return moved


def base_input(seed: int, shape=(2, 9, 70)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])
    x[0, 2, 40:60] = 0.0  # all-zero blocks of 16 and 32
    x[1, :, 5] *= 300.0  # an outlier channel
    # Zero bounds exactly on histogram edges: MXFP4's 1/4 · 2^(4 - 2) = 1 (an edge at the start of a run
    # of the C code's bin table), and INT8 per_group's 1/2 · fl(m / 127) = the float32 above 10^-0.99
    # (an edge inside a run).
    x[0, 1, 0], x[0, 3, 0] = 20.0, 25.99164390563965
    x[0, 1, 1:] = x[0, 1, 1:].clamp(-19.0, 19.0)
    x[0, 3, 1:] = x[0, 3, 1:].clamp(-19.0, 19.0)
    return x


def counted(x: torch.Tensor, configs) -> element.Counted:
    return measure(x, configs).counted


def assert_same(a: element.Counted, b: element.Counted) -> None:
    assert torch.equal(a.counts, b.counts), (a.counts - b.counts).nonzero().tolist()
    assert torch.equal(a.nonfinite, b.nonfinite)
    assert torch.equal(a.hist, b.hist) and torch.equal(a.bounds[:, :2], b.bounds[:, :2])
    assert torch.allclose(a.bounds[:, 2:], b.bounds[:, 2:], rtol=1e-12, atol=0)


def reference_counts(x: torch.Tensor, cfg: QuantizerConfig) -> list[int]:
    """Kernel, subnormal and whole-kernel-block counts of ``x`` by the format's own fake quantization,
    one sequence at a time, the non-finite elements left out (measured as 0 for the scales)."""
    xf = x.float()
    finite = xf.isfinite()
    clean = torch.where(finite, xf, 0.0)
    fmt = cfg.format
    kernel = sub = whole = 0
    for seq, ok in zip(clean, finite, strict=True):
        q, _ = F.quantize(seq, fmt)
        zero = (q == 0) & ok
        kernel += int(zero.sum())
        sub += int((fmt.grid.subnormal(q) & ok).sum())
        if fmt.is_block:
            whole += int(F.whole_blocks(zero, fmt).sum())
    return [kernel, sub, whole]


@on_each_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_native_count_equals_the_torch_code_and_the_formats_at_their_thresholds(monkeypatch, dtype, seed):
    for cfg in CONFIGS:
        x = at_the_thresholds(base_input(seed).to(dtype), cfg.format, seed)
        x[0, 3, 7], x[1, 4, 30], x[1, 8, 69] = float("nan"), float("inf"), float("-inf")
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
        mine = counted(x, [cfg])
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
        assert_same(mine, counted(x, [cfg]))
        kernel, sub, whole = reference_counts(x, cfg)
        assert mine.counts[0, 0] == kernel, cfg.label
        assert mine.counts[0, 1] == (0 if cfg.format.grid.is_int else sub), cfg.label
        assert mine.counts[0, 3] == whole, cfg.label
        assert int(mine.nonfinite) == 3


@on_each_build
def test_all_configurations_in_one_count_equal_each_alone():
    """Terms grouped by block size, with block maxima shared between sizes that divide each other,
    count what each counts alone."""
    x = base_input(5, (3, 17, 96))
    together = counted(x, CONFIGS)
    plan = element.make_plan(CONFIGS, HISTOGRAM)
    for i, cfg in enumerate(CONFIGS):
        alone = counted(x, [cfg])
        assert torch.equal(together.counts[i], alone.counts[0]), cfg.label
        if cfg.format.is_block:
            slot = plan.slots[i]
            assert torch.equal(together.hist[slot], alone.hist[0])
            assert torch.equal(together.bounds[slot], alone.bounds[0])


@on_each_build
def test_wide_rows_with_block_maxima_on_powers_of_two_count_as_the_torch_code(monkeypatch):
    """Rows of many blocks (where the C code spreads a row's histogram over copies) whose block maxima
    sit exactly on a power of two, on 6 times one (where MXFP4's RCEIL scale changes exponent) and one
    float either side, beside all-zero blocks and blocks of subnormals."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 1000, generator=g) * torch.logspace(-2, 2, 1000)
    tops = torch.tensor([1.0, 6.0, 0.75, 2.0**-20])
    # (2, 6, 31): one per block of 32
    peaks = (tops[torch.randint(len(tops), (2, 6, 31), generator=g)]
             * 2.0 ** torch.randint(-8, 8, (2, 6, 31), generator=g).float())
    # below, at, above
    peaks = torch.nextafter(peaks, peaks * torch.randint(0, 3, peaks.shape, generator=g).float())
    blocks = x[..., : 31 * 32].reshape(2, 6, 31, 32).clone()  # (2, 6, 31 blocks, 32)
    blocks[..., 1:] = blocks[..., 1:].clamp(-1, 1) * peaks.abs().unsqueeze(-1) * 0.99
    blocks[..., 0] = peaks  # each block's maximum: its peak
    x[..., : 31 * 32] = blocks.reshape(2, 6, 31 * 32)
    x[0, 0, 64:192] = 0.0  # all-zero blocks
    x[1, 2, 320:448] = 1e-40  # float32 subnormals
    x[1, 3, 512:544] = torch.linspace(-5e-38, 5e-38, 32)  # MXFP4's amax / 6 a subnormal above 2^-127
    peaked = (F.unit_amax(x.abs(), expand_configs(["mxfp4"], [4], [])[0].format)[..., :31]
              == peaks.abs())  # (2, 6, 31)
    assert peaked.float().mean() > 0.9  # the zero and subnormal stretches aside, the peaks are the maxima
    configs = [c for c in CONFIGS if c.format.is_block]
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
    mine = counted(x, configs)
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    assert_same(mine, counted(x, configs))
    for i, cfg in enumerate(configs):
        assert mine.counts[i, 0] == reference_counts(x, cfg)[0], cfg.label


@on_each_build
@pytest.mark.parametrize("scale", [1e-38, 1e-42, 3e38])
def test_scales_outside_the_normal_range_search_their_thresholds(monkeypatch, scale):
    """Where τ·s or the subnormal top times s is no normal float (float32 subnormal inputs, or
    products near overflow), the C code searches the threshold instead of multiplying; the counts
    are still those of the divisions."""
    x = base_input(7) / 10 * scale if scale < 1 else base_input(7).clamp(-1, 1) * scale
    x = x.float()
    for cfg in CONFIGS:
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
        mine = counted(x, [cfg])
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
        assert_same(mine, counted(x, [cfg]))
        assert mine.counts[0, 0] == reference_counts(x, cfg)[0], cfg.label


def test_the_bin_table_gives_the_bins_of_the_edges():
    table = native.bin_table(HISTOGRAM.edges)
    edges = HISTOGRAM.edges.float()
    g = torch.Generator().manual_seed(3)
    values = torch.cat([(10 ** (torch.rand(100_000, generator=g, dtype=torch.float64) * 20 - 12)).float(),
                        edges, torch.nextafter(edges, torch.tensor(0.0)),
                        torch.nextafter(edges, torch.tensor(1e30)),
                        torch.tensor([0.0, 1e-45, 3.4e38])])
    bits = values.view(torch.int32).long()
    run = bits >> 16
    got = table[run].long() + (bits >= (table[65536 + run].long() & 0xFFFFFFFF)).long()
    assert torch.equal(got, HISTOGRAM.bin_of(values))


@on_each_build
def test_the_native_histogram_counts_what_the_torch_one_counts(monkeypatch):
    edges = HISTOGRAM.edges.float()
    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.tensor([0.0, -0.0, 1e-45, 3.4e38, float("inf"), -2.0, float("nan")]), edges,
                        torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e30)),
                        (10 ** (torch.rand(30_000, generator=g, dtype=torch.float64) * 20 - 12)).float()])
    values = values[: values.numel() // 3 * 3]  # three equal groups
    for weight, groups in ((1, 1), (7, 3)):
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
        want = element.histogram(values, weight, groups, binning=HISTOGRAM)
        assert torch.equal(want, HISTOGRAM.counts(values, weight, groups=groups))
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
        assert torch.equal(element.histogram(values, weight, groups, binning=HISTOGRAM), want)
        assert int(want.sum()) == weight * values.numel()


@on_each_build
def test_a_library_that_does_not_match_its_mirror_is_refused(monkeypatch):
    lib = native.library()
    native.check_abi(lib)
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    with pytest.raises(RuntimeError, match="does not match"):
        native.check_abi(lib)
    monkeypatch.undo()
    monkeypatch.setattr(native, "LAYOUTS", {**native.LAYOUTS, "block": 7})
    with pytest.raises(RuntimeError, match="does not match"):
        native.check_abi(lib)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return bool(((a.view(view) == b.view(view)) | (a.isnan() & b.isnan())).all())


@on_each_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fake_quantization_equals_the_formats_bit_for_bit(dtype):
    lib = native.library()
    for cfg in CONFIGS:
        fmt = cfg.format
        x = at_the_thresholds(base_input(11).to(dtype), fmt, 3).contiguous()
        x[1, 2, 3] = float("nan")  # NaN maxima propagate into their scales, as in torch
        x[0, 5, 9] = float("inf")
        factors = crossquant_factors(x.float(), fmt.alpha) if fmt.layout == "crossquant" else None
        out, zeros = native.quantize(lib, x, fmt, native.QUANTIZE, factors=factors)
        q, s = F.quantize(x, fmt)
        assert bits_equal(out, F.dequantize(q, s, fmt).to(dtype)), cfg.label
        assert int(zeros) == int(q.numel() - torch.count_nonzero(q)), cfg.label
        for lam in (1.0, 0.37, 3.0):
            out, zeros = native.quantize(lib, x, fmt, native.REMOVE_KERNEL, lam * fmt.tau, factors)
            want, removed = F.remove_kernel(x, fmt, scale=lam)
            assert bits_equal(out, want) and int(zeros) == int(removed), (cfg.label, lam)


def float32(v: float) -> float:
    """``v`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


@pytest.mark.parametrize("name", ["per_token", "fp8_per_token", "mxfp4", "nvfp4"])
def test_the_kernel_is_the_magnitude_of_the_quotient_against_scale_times_tau(name):
    """:func:`~kernelscope.quant.formats.in_kernel`, element by element against plain Python: at the
    bound, one float32 either side, negated, zero, NaN and ±Inf."""
    fmt = F.get_format(name, bits=4 if name == "per_token" else None)
    for scale in (1.0, 0.37, 3.0):
        limit = float32(scale * fmt.tau)
        at = torch.tensor([limit], dtype=torch.float32)
        near = [at, torch.nextafter(at, torch.zeros(1)), torch.nextafter(at, torch.full((1,), 1e30))]
        values = torch.cat([*near, *(-v for v in near), torch.tensor([0.0, -0.0, 1e-45, math.nan, math.inf,
                                                                       -math.inf, 2.5, -1e30])])
        got = F.in_kernel(values.reshape(2, 1, -1), fmt, scale).reshape(-1).tolist()
        want = [not math.isnan(v) and abs(v) <= limit for v in values.tolist()]
        assert got == want, (name, scale)
        assert got[:6] == [True, True, False] * 2  # the tie is in the kernel, the float above is not


def naive_removal(x: torch.Tensor, fmt: F.Format, lam: float) -> torch.Tensor:
    """``x`` with the elements ``|x / s| <= λ·τ`` zeroed, one element at a time from the scales."""
    s = F.expand_scale(F.scale(x, fmt), fmt, x.shape[-1]).expand(x.shape).float()  # (B, T, I)
    limit = float32(lam * fmt.tau)
    out = x.clone()
    for i, (v, si) in enumerate(zip(x.float().reshape(-1).tolist(), s.reshape(-1).tolist(), strict=True)):
        if abs(float32(v / (si if si != 0 else 1.0))) <= limit:
            out.view(-1)[i] = 0.0
    return out


@on_each_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_interface_treats_activations_as_the_formats_do_on_either_backend(monkeypatch, dtype):
    """:func:`kernelscope.element.fake_quantize` and :func:`~kernelscope.element.remove_kernel` run the
    C code where it runs (float32 and bfloat16 on CPU) and the torch code elsewhere; either gives the
    formats' tensors bit for bit, and the count of what went to zero."""
    for cfg in CONFIGS[::3]:
        fmt = cfg.format
        x = at_the_thresholds(base_input(13, (2, 5, 40)).to(dtype), fmt, 4)
        monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")
        assert (element._native_input(x) is not None) == (dtype != torch.float16)
        out, zeros = element.fake_quantize(x, fmt)
        q, s = F.quantize(x, fmt)
        assert out.dtype == dtype and bits_equal(out, F.dequantize(q, s, fmt).to(dtype)), cfg.label
        assert int(zeros) == int((q == 0).sum()), cfg.label
        for lam in (1.0, 0.37):
            removed, zeroed = element.remove_kernel(x, fmt, lam)
            want = naive_removal(x, fmt, lam)
            # every element outside the kernel is nonzero: the zeros of the result are the kernel
            assert bits_equal(removed, want) and int(zeroed) == int((want == 0).sum()), (cfg.label, lam)
            monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
            again, zeroed_again = element.remove_kernel(x, fmt, lam)
            assert bits_equal(again, removed) and int(zeroed_again) == int(zeroed), (cfg.label, lam)
            monkeypatch.setenv("KERNELSCOPE_NATIVE", "1")


def test_only_the_element_package_reaches_its_backends():
    """Statistics and runs go through :mod:`kernelscope.element`, never to its C or torch side."""
    from tests.test_architecture import graph

    edges = graph()
    inside = {m for m in edges if m.startswith("kernelscope.element.")}
    assert {"kernelscope.element.native", "kernelscope.element.reference"} <= inside
    crossing = [f"{m} -> {t}" for m, targets in edges.items()
                if m != "kernelscope.element" and not m.startswith("kernelscope.element.")
                for t in sorted(targets & inside)]
    assert crossing == []
