"""The CPU build of the two per-element passes (``native.c``), compiled once per machine and cached.

The C source is built with the system's C compiler on first use into
``$KERNELSCOPE_CACHE`` (default ``$XDG_CACHE_HOME/kernelscope``, i.e. ``~/.cache/kernelscope``),
under a name that hashes the source, the compiler, the flags and the CPU's features, so a cache
shared by different machines never hands one a library built for another. Building takes well
under a second. Where no compiler works, :func:`library` returns None with the reason in
:data:`failure`, and the statistics run as torch code instead (the same integers, more slowly).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernelscope.quant import STEP_FLOOR
from kernelscope.quant.formats import NVFP4_BLOCK_GRID, Form, Format, Unit, nvfp4_tensor_divisor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fno-strict-aliasing", "-fPIC",
         "-shared"]
"""No -ffast-math, no contraction into fused multiply-adds: every float operation stays one IEEE
operation, so the counts equal those of the torch code."""
ARCH_FLAGS = (["-march=native"], [])
THREAD_FLAGS = (["-fopenmp"], ["-fopenmp-simd"], [])
"""Tried in order: the fastest build first, then builds without what the compiler may lack."""

MAX_TERMS = 64  # KS_MAX_TERMS in native.c
ABI_VERSION = 3  # KS_ABI_VERSION in native.c
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
LAYOUTS = {Unit.TOKEN: 0, Unit.TENSOR: 1, Unit.CHANNEL: 2, Unit.CROSSQUANT: 3, Unit.BLOCK: 4}
"""A format's :attr:`~kernelscope.quant.formats.Format.layout` as the C count names it (KS_TOKEN ...)."""
FORMS = {Form.ABSMAX: 0, Form.E8M0_FLOOR: 1, Form.E8M0_RCEIL: 2, Form.NVFP4: 3}
"""A scale rule's form as the C count names it (KS_ABSMAX ...)."""
COUNTS = ("kernel", "subnormal", "below_per_token", "kernel_blocks")
"""The counts of each term, in the order of KS_KERNEL ... KS_KERNEL_BLOCKS."""


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
        raise RuntimeError(f"native statistics library does not match kernelscope.stats.native "
                           f"(ABI {got[:3]} against {want[:3]}); rebuild it")


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
failure: str | None = None
"""Why the native library is not in use, once a build was attempted and failed."""
built_with: str | None = None
"""The flags the library in use was built with."""


def cache_dir() -> Path:
    root = os.environ.get("KERNELSCOPE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernelscope"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


def _version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _places() -> list[Path]:
    """Where a build may live: the cache, then (if that cannot be written) a folder in the temp dir."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [cache_dir(), Path(tempfile.gettempdir()) / f"kernelscope-{user}"]


def _build(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile to ``target`` through a temporary file and a rename; the error's first line, or None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        return f"cannot write {target.parent}: {exc.strerror or exc}"
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            error = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
            return error[:200] or f"{compiler} exited with {done.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
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


def _obtain(compiler: str, flags: list[str], fingerprint: bytes) -> tuple[ctypes.CDLL | None, str | None]:
    """The library built with ``flags``, from the cache or freshly built: (library, None) or (None, why)."""
    key = hashlib.sha256(fingerprint + b"\0" + " ".join(flags).encode()).hexdigest()[:16]
    error = None
    for place in _places():
        target = place / f"native-{key}.so"
        error = None if target.is_file() else _build(compiler, flags, target)
        if error is None:
            try:
                return _load(target), None
            except (OSError, AttributeError, RuntimeError) as exc:
                return None, f"loading failed: {exc}"[:200]
        if not error.startswith("cannot write"):
            break
    return None, error


def _first_build(compiler: str, archs) -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """The first of the builds for ``archs`` (lists of flags) and THREAD_FLAGS that compiles and loads:
    (library, its flags, None), or (None, None, why the first failed)."""
    fingerprint = b"\0".join([SOURCE.read_bytes(), compiler.encode(), _version(compiler).encode(),
                              _cpu_features().encode(), platform.machine().encode()])
    reasons = []
    for arch, threads in itertools.product(archs, THREAD_FLAGS):  # the fastest build first
        lib, error = _obtain(compiler, [*FLAGS, *arch, *threads], fingerprint)
        if lib is not None:
            return lib, " ".join([*arch, *threads]) or "portable", None
        reasons.append(error)
    return None, None, f"{compiler}: {reasons[0]}"


def build_for(arch: list[str]) -> ctypes.CDLL | None:
    """The library built for the target ``arch`` flags name (``[]``: the compiler's baseline) instead
    of this CPU, or None: the code paths a CPU without this one's vector instructions runs."""
    compiler = _compiler()
    return None if compiler is None else _first_build(compiler, [arch])[0]


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None where that is not possible."""
    global _library, _tried, failure, built_with
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        compiler = _compiler()
        if compiler is None:
            failure = "no C compiler found (set CC)"
        else:
            _library, built_with, failure = _first_build(compiler, ARCH_FLAGS)
        if failure is not None:
            log.warning("kernelscope: statistics run as torch code; the native build failed (%s)", failure)
        _tried = True
        return _library


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call builds or loads it again."""
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
