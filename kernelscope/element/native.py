"""The CPU build of the per-element work (``native.c``: the two passes of a profile and fake
quantization), built when kernelscope is installed; :mod:`kernelscope.element` decides when it runs.

``setup.py`` compiles the C source into shared libraries beside this module when the package is
built or installed (``pip install .``, ``pip install -e .``, a wheel); nothing is compiled at run
time. On x86-64 there is one library per instruction-set level (the compiler's baseline,
``x86-64-v3``, ``x86-64-v4``: ``-march=native`` would not run on another machine than the one that
built it), and :func:`library` loads the highest level this CPU runs. Where none was built (no C
compiler at install time), or none loads, :func:`library` returns None with the reason in
:data:`failure`, and the statistics run as torch code instead (the same integers, more slowly).
Reinstalling kernelscope (``pip install -e .`` for a checkout) rebuilds the libraries; one built
from another ``native.c`` than the one beside this module is refused.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import threading
from pathlib import Path

import torch

from kernelscope.element.plan import COUNTS
from kernelscope.quant import STEP_FLOOR
from kernelscope.quant.formats import NVFP4_BLOCK_GRID, Form, Format, Unit, nvfp4_tensor_divisor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
LIBRARY_DIR = Path(__file__).parent
"""Where setup.py puts the libraries: beside this module."""
SUFFIX = ".dll" if os.name == "nt" else ".so"
_V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
LEVELS = {"x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "x86-64-v3": _V3}
"""The instruction-set levels setup.py builds a library for, highest first, with the CPU features
(as /proc/cpuinfo names them) that each ``-march`` level lets the compiler use."""
_TORCH_LEVELS = {"AVX512": {"x86-64-v4", "x86-64-v3"}, "AVX2": {"x86-64-v3"}}
"""Where /proc/cpuinfo is not to be read: the levels torch's own CPU dispatch vouches for."""

MAX_TERMS = 64  # KS_MAX_TERMS in native.c
ABI_VERSION = 3  # KS_ABI_VERSION in native.c
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
LAYOUTS = {Unit.TOKEN: 0, Unit.TENSOR: 1, Unit.CHANNEL: 2, Unit.CROSSQUANT: 3, Unit.BLOCK: 4}
"""A format's :attr:`~kernelscope.quant.formats.Format.layout` as the C count names it (KS_TOKEN ...)."""
FORMS = {Form.ABSMAX: 0, Form.E8M0_FLOOR: 1, Form.E8M0_RCEIL: 2, Form.NVFP4: 3}
"""A scale rule's form as the C count names it (KS_ABSMAX ...)."""


class Term(ctypes.Structure):
    """``ks_term`` of native.c, field by field: one quantizer as the C count takes it."""

    _fields_ = [
        ("layout", ctypes.c_int32), ("form", ctypes.c_int32), ("block", ctypes.c_int32),
        ("emax", ctypes.c_int32), ("slot", ctypes.c_int32), ("inner_emin", ctypes.c_int32),
        ("inner_mbits", ctypes.c_int32), ("reserved", ctypes.c_int32), ("divisor", ctypes.c_float),
        ("floor_", ctypes.c_float), ("tau", ctypes.c_float), ("sub_hi", ctypes.c_float),
        ("below_qmax", ctypes.c_float), ("tensor_divisor", ctypes.c_float), ("inner_min", ctypes.c_float),
        ("inner_max", ctypes.c_float),
    ]


def _expected_abi() -> list[int]:
    """What ``ks_abi`` must report for this module's mirror of the C definitions."""
    offsets = [getattr(Term, name).offset for name, _ in Term._fields_ if name != "reserved"]
    return [ABI_VERSION, ctypes.sizeof(Term), MAX_TERMS, *offsets, *DTYPES.values(), *LAYOUTS.values(),
            *FORMS.values(), *range(len(COUNTS)), len(COUNTS)]


def check_abi(lib: ctypes.CDLL) -> None:
    """Refuse a library whose structure layout or constants differ from this module's mirror."""
    want = _expected_abi()
    out = (ctypes.c_int64 * (len(want) + 8))()
    n = lib.ks_abi(out, len(want) + 8)
    got = list(out[:n])
    if got != want:
        raise RuntimeError(f"native statistics library does not match kernelscope.element.native "
                           f"(ABI {got[:3]} against {want[:3]}); rebuild it")


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
failure: str | None = None
"""Why the native library is not in use, once loading it was attempted and failed."""
built_with: str | None = None
"""The flags the library in use was built with."""


def _cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them, or None where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _runs(level: str) -> bool:
    """Whether this CPU has every feature that code built for ``level`` may use."""
    flags = _cpu_flags()
    if flags is None:
        return level in _TORCH_LEVELS.get(torch.backends.cpu.get_cpu_capability(), set())
    return LEVELS[level] <= flags


def candidates() -> list[Path]:
    """The built libraries this CPU runs, the fastest first: those of the instruction-set levels it
    has, then the plain one (the baseline, or a build for the ``KERNELSCOPE_NATIVE_ARCH`` target)."""
    found = [LIBRARY_DIR / f"_native.{level}{SUFFIX}" for level in LEVELS]
    found = [path for path, level in zip(found, LEVELS, strict=True) if path.is_file() and _runs(level)]
    plain = LIBRARY_DIR / f"_native{SUFFIX}"
    return [*found, plain] if plain.is_file() else found


def _build_of(lib: ctypes.CDLL) -> str:
    """The flags ``lib`` was built with, after checking that it was built from :data:`SOURCE` (where
    the source is there to compare): a library older than its source would count by old rules."""
    lib.ks_build_flags.restype = ctypes.c_char_p
    lib.ks_build_source.restype = ctypes.c_char_p
    if SOURCE.is_file():
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
        if lib.ks_build_source().decode() != digest:
            raise RuntimeError(f"it was built from another {SOURCE.name} than {SOURCE}; reinstall "
                               "kernelscope to rebuild it")
    return lib.ks_build_flags().decode()


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions typed, once its ABI matches this module's mirror."""
    lib = ctypes.CDLL(str(path))
    lib.ks_abi.restype = ctypes.c_int
    lib.ks_abi.argtypes = [ctypes.c_void_p, ctypes.c_int]
    check_abi(lib)
    lib.ks_ranges.restype = None
    lib.ks_ranges.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.ks_ranges_scratch.restype = ctypes.c_int64
    lib.ks_ranges_scratch.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.ks_count_scratch.restype = ctypes.c_int64
    lib.ks_count_scratch.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int, ctypes.POINTER(Term), ctypes.c_int, ctypes.c_int]
    lib.ks_count.restype = ctypes.c_int
    lib.ks_count.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, dtype, S, T, I
        ctypes.c_void_p, ctypes.c_void_p,  # t, c
        ctypes.c_int, ctypes.POINTER(Term), ctypes.c_void_p, ctypes.c_void_p,  # terms, rows, cols
        ctypes.c_void_p, ctypes.c_int, ctypes.c_float,  # bin table, bins, step floor
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # counts, bounds, hist, nonfinite
        ctypes.c_int, ctypes.c_void_p,  # threads, scratch
    ]
    lib.ks_histogram.restype = None
    lib.ks_histogram.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_int64, ctypes.c_void_p]
    lib.ks_quantize_scratch.restype = ctypes.c_int64
    lib.ks_quantize_scratch.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.ks_quantize.restype = ctypes.c_int
    lib.ks_quantize.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # x, dtype, S, T, I
        ctypes.POINTER(Term), ctypes.c_void_p, ctypes.c_void_p,  # term, rows, cols
        # mode, limit, emin, mbits, is_int
        ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,  # out, zeros, threads, scratch
    ]
    return lib


def _open() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """The first of :func:`candidates` that loads: (library, its flags, None), or (None, None, why)."""
    paths = candidates()
    if not paths:
        return None, None, (f"no native library for this CPU in {LIBRARY_DIR} (it is built when "
                            "kernelscope is installed, where a C compiler is found)")
    errors = []
    for path in paths:
        try:
            lib = load(path)
            return lib, _build_of(lib), None
        except (OSError, AttributeError, RuntimeError) as exc:
            errors.append(f"{path.name} cannot be used: {exc}"[:300])
    return None, None, errors[0]


def library() -> ctypes.CDLL | None:
    """The loaded library, opened on first use; None where there is none that this CPU can use."""
    global _library, _tried, failure, built_with
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        _library, built_with, failure = _open()
        if failure is not None:
            absent = not candidates()
            (log.info if absent else log.warning)(
                "kernelscope: statistics run as torch code; the native library is not in use (%s)", failure)
        _tried = True
        return _library


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call opens it again."""
    global _library, _tried, failure, built_with
    with _lock:
        _library, _tried, failure, built_with = None, False, None, None


_local = threading.local()


def _scratch_ptr(nbytes: int) -> int:
    """Scratch space for one call, from a block each thread keeps between calls (grown, never shrunk):
    the C code allocates nothing, so it cannot leave holes among a model's activations."""
    block = getattr(_local, "scratch", None)
    if block is None or block.numel() < nbytes:
        block = _local.scratch = torch.empty(max(nbytes, 2 * (0 if block is None else block.numel())),
                                             dtype=torch.uint8)
    return block.data_ptr()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _outputs(out, shapes, dtype) -> tuple[torch.Tensor, ...]:
    if out is None:
        return tuple(torch.empty(shape, dtype=dtype) for shape in shapes)
    for t, shape in zip(out, shapes, strict=True):
        if t.shape != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"an output must be a contiguous CPU {dtype} tensor of shape {tuple(shape)}")
    return tuple(out)


def ranges(lib: ctypes.CDLL, x: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """t ``(S, T, 1)`` and c ``(S, 1, I)`` float32 of a contiguous float32 or bfloat16 ``x (S, T, I)``,
    written into ``out`` when given."""
    s, t_len, width = x.shape
    token, channel = _outputs(out, [(s, t_len, 1), (s, 1, width)], torch.float32)
    threads = torch.get_num_threads()
    lib.ks_ranges(x.data_ptr(), DTYPES[x.dtype], s, t_len, width, token.data_ptr(), channel.data_ptr(),
                  threads, _scratch_ptr(lib.ks_ranges_scratch(width, threads)))
    return token, channel


def term_of(fmt: Format, slot: int = -1) -> Term:
    """The C count's description of ``fmt``: its scale layout and form, τ, the subnormal range's top,
    the per-token width it is compared with, all read from the format's data. ``slot``: the row of
    the block outputs a block format writes."""
    grid, rule = fmt.grid, fmt.rule
    term = Term(layout=LAYOUTS[fmt.layout], form=FORMS[rule.form], slot=slot,
                divisor=grid.max_value, floor_=rule.floor, tau=grid.tau)
    if fmt.is_block:
        term.block = fmt.block_size
    term.emax = 0 if grid.is_int else grid.emax
    sub = grid.subnormal_range
    term.sub_hi = 0.0 if sub is None else sub[1]
    term.below_qmax = float(grid.max_value) if fmt.per_token_comparable else 0.0
    inner = NVFP4_BLOCK_GRID
    term.tensor_divisor = nvfp4_tensor_divisor(grid)
    term.inner_min, term.inner_max = inner.min_normal, inner.max_value
    term.inner_emin, term.inner_mbits = inner.emin, inner.mantissa_bits
    return term


class CountPlan:
    """The fixed part of a ``ks_count`` call for a list of formats (their terms as one C array, built
    once and used for every batch): a call pays only for its own pointers."""

    def __init__(self, fmts: list[Format], slots: list[int], edges: torch.Tensor) -> None:
        n = len(fmts)
        if n > MAX_TERMS:
            raise ValueError(
                f"the native statistics take at most {MAX_TERMS} configurations at once, got {n}")
        self.size = n
        self.terms = (Term * n)(*(term_of(f, s) for f, s in zip(fmts, slots, strict=True)))
        self.edges = edges.to(torch.float64).contiguous()  # interior histogram edges
        self.bins = self.edges.numel() + 1
        self.table = bin_table(self.edges)
        self.slots = max(slots, default=-1) + 1

    def run(self, lib: ctypes.CDLL, x: torch.Tensor, token: torch.Tensor, channel: torch.Tensor,
            rows: list[torch.Tensor | None], cols: list[torch.Tensor | None], out) -> None:
        """Count a contiguous ``x (S, T, I)`` whose token and channel maxima are ``token`` (S·T) and
        ``channel`` (S·I), contiguous float32, into ``out = (counts (C, 4), bounds (slots, 2 + S),
        hist (slots, bins), nonfinite ())``. ``rows``/``cols``: the factors of each separable term,
        contiguous float32 ``(S, T)`` and ``(S, I)`` (None for other terms)."""
        s, t_len, width = x.shape
        counts, bounds, hist, nonfinite = out
        _check_out(counts, (self.size, len(COUNTS)), torch.int64)
        _check_out(bounds, (self.slots, 2 + s), torch.float64)
        _check_out(hist, (self.slots, self.bins), torch.int64)
        _check_out(nonfinite, (), torch.int64)
        for v, size in ((token, s * t_len), (channel, s * width)):
            _check_vector(v, size)
        for r, c in zip(rows, cols, strict=True):
            if r is not None:
                _check_vector(r, s * t_len)
                _check_vector(c, s * width)
        pointers = ctypes.c_void_p * self.size
        threads = torch.get_num_threads()
        dtype = DTYPES[x.dtype]
        scratch = _scratch_ptr(lib.ks_count_scratch(dtype, s, t_len, width, self.size, self.terms, self.bins,
                                                    threads))
        status = lib.ks_count(
            x.data_ptr(), dtype, s, t_len, width, token.data_ptr(), channel.data_ptr(), self.size, self.terms,
            pointers(*map(_ptr, rows)), pointers(*map(_ptr, cols)), self.table.data_ptr(), self.bins,
            STEP_FLOOR, counts.data_ptr(), bounds.data_ptr(), hist.data_ptr(), nonfinite.data_ptr(), threads,
            scratch,
        )
        if status != 0:
            raise RuntimeError(f"native count failed with status {status}")


def histogram(lib: ctypes.CDLL, values: torch.Tensor, groups: int, weight: int, edges: torch.Tensor,
              table: torch.Tensor) -> torch.Tensor:
    """int64 counts ``(groups, len(edges) + 1)`` of a contiguous CPU float32 ``values`` split into
    ``groups`` equal rows, each value standing for ``weight`` items, in the bins of ``table``
    (:func:`bin_table` of ``edges``)."""
    _check_vector(values, values.numel())
    if values.numel() % groups:
        raise ValueError(f"{values.numel()} values do not split into {groups} equal groups")
    bins = edges.numel() + 1
    out = torch.empty((groups, bins), dtype=torch.int64)
    lib.ks_histogram(values.data_ptr(), groups, values.numel() // groups, table.data_ptr(), bins, weight,
                     out.data_ptr())
    return out


def bin_table(edges: torch.Tensor) -> torch.Tensor:
    """What the C count reads a non-negative float32's histogram bin from, int32 ``(2·65536,)``: for each
    run of 2^16 consecutive bit patterns (narrower than a bin, so at most one edge falls inside), how
    many ``edges`` are <= its first value, then the bits of the smallest float32 at or above the next
    edge (all ones past the last): a bound's bin is the first, plus one where its bits reach the
    second. The same bins as ``torch.searchsorted(edges, bound, right=True)``."""
    first = (torch.arange(1 << 16, dtype=torch.int64) << 16).to(torch.int32).view(torch.float32)  # (65536,)
    count = torch.searchsorted(edges, first.double(), right=True)  # (65536,)
    following = edges[count.clamp_max(edges.numel() - 1)]  # (65536,) float64
    up = following.float()
    up = torch.where(up.double() < following, torch.nextafter(up, torch.tensor(math.inf)), up)  # rounded up
    cut = torch.where(count < edges.numel(), up.view(torch.int32), torch.tensor(-1, dtype=torch.int32))
    return torch.cat([count.to(torch.int32), cut]).contiguous()


def _check_out(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"an output must be a contiguous CPU {dtype} tensor of shape {shape}")


def _check_vector(v: torch.Tensor, size: int) -> None:
    """The C code reads a vector's memory whole: refuse anything but a full contiguous float32 one."""
    if v.dtype != torch.float32 or not v.is_contiguous() or v.numel() != size or v.device.type != "cpu":
        raise ValueError(
            f"a vector for the native statistics must be contiguous CPU float32 of {size} elements")


QUANTIZE, REMOVE_KERNEL = 0, 1
"""The two things ``ks_quantize`` does to an activation: fake quantization, or its kernel zeroed."""


def quantize(lib: ctypes.CDLL, x: torch.Tensor, fmt: Format, mode: int, limit: float = 0.0,
             factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (S, T, I)`` (contiguous float32 or bfloat16 on the CPU) fake-quantized by ``fmt`` (mode
    :data:`QUANTIZE`) or with its kernel ``|x / s| <= limit`` zeroed (:data:`REMOVE_KERNEL`), as a new
    tensor of ``x``'s dtype, and how many elements went to zero. ``factors``: a separable format's
    ``(row (S, T, 1), col (S, 1, I))``, as :func:`~kernelscope.quant.crossquant_factors` gives them
    for ``x``."""
    s, t_len, width = x.shape
    term = term_of(fmt)
    rows = cols = None
    if fmt.layout is Unit.CROSSQUANT:
        rows, cols = factors[0].expand(s, t_len, 1).contiguous(), factors[1].expand(s, 1, width).contiguous()
        _check_vector(rows, s * t_len)
        _check_vector(cols, s * width)
    out = torch.empty_like(x)
    zeros = torch.zeros((), dtype=torch.int64)
    grid = fmt.grid
    threads = torch.get_num_threads()
    scratch = _scratch_ptr(lib.ks_quantize_scratch(s, t_len, width, threads))
    status = lib.ks_quantize(x.data_ptr(), DTYPES[x.dtype], s, t_len, width, ctypes.byref(term), _ptr(rows),
                             _ptr(cols), mode, limit, grid.emin, grid.mantissa_bits, int(grid.is_int),
                             out.data_ptr(), zeros.data_ptr(), threads, scratch)
    if status != 0:
        raise RuntimeError(f"native fake quantization failed with status {status}")
    return out, zeros
