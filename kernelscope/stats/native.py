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
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernelscope.quant import STEP_FLOOR

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared"]
"""No -ffast-math, no contraction into fused multiply-adds: every float operation stays one IEEE
operation, so the counts equal those of the torch code."""
ARCH_FLAGS = (["-march=native"], [])
THREAD_FLAGS = (["-fopenmp"], [])
"""Tried in order: the fastest build first, then builds without what the compiler may lack."""

ROW, COL, SEP, TOKEN = 0, 1, 2, 3  # KS_ROW ... KS_TOKEN in native.c
MAX_TERMS = 64  # KS_MAX_TERMS in native.c
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

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
            return lines[0][:200] if lines else f"{compiler} exited with {done.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ks_ranges.restype = None
    lib.ks_ranges.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.ks_ranges_scratch.restype = ctypes.c_int64
    lib.ks_ranges_scratch.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.ks_count_scratch.restype = ctypes.c_int64
    lib.ks_count_scratch.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int]
    lib.ks_count.restype = ctypes.c_int
    lib.ks_count.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
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
            except OSError as exc:
                return None, f"loading failed: {exc}"[:200]
        if not error.startswith("cannot write"):
            break
    return None, error


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
            fingerprint = b"\0".join([SOURCE.read_bytes(), compiler.encode(), _version(compiler).encode(),
                                      _cpu_features().encode(), platform.machine().encode()])
            reasons = []
            for arch, threads in itertools.product(ARCH_FLAGS, THREAD_FLAGS):  # the fastest build first
                lib, error = _obtain(compiler, [*FLAGS, *arch, *threads], fingerprint)
                if lib is not None:
                    _library, built_with = lib, " ".join([*arch, *threads]) or "portable"
                    break
                reasons.append(error)
            failure = None if _library is not None else f"{compiler}: {reasons[0]}"
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
    lib.ks_ranges(x.data_ptr(), DTYPES[x.dtype], s, t_len, width, token.data_ptr(), channel.data_ptr(), threads,
                  _scratch_ptr(lib.ks_ranges_scratch(width, threads)))
    return token, channel


class CountPlan:
    """The part of a ``ks_count`` call fixed by the terms' forms (kinds, widths, below-per-token
    widths as C arrays): built once for a list of configurations and used for every batch, so a
    batch pays only for its own pointers."""

    def __init__(self, kinds: list[int], qmax: list[float], below_qmax: list[float]) -> None:
        n = len(kinds)
        if n > MAX_TERMS:
            raise ValueError(f"the native statistics take at most {MAX_TERMS} configurations at once, got {n}")
        self.size = n
        self.kinds = (ctypes.c_int32 * n)(*kinds)
        self.qmax = (ctypes.c_float * n)(*qmax)
        self.below_qmax = (ctypes.c_float * n)(*below_qmax)
        self.ncol, self.nsep = kinds.count(COL), kinds.count(SEP)

    def run(self, lib: ctypes.CDLL, x: torch.Tensor, token: torch.Tensor, a: list[torch.Tensor | None],
            b: list[torch.Tensor | None], out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kernel (C,), below (C,), nonfinite ())`` int64 of a contiguous ``x (S, T, I)`` with token
        maxima ``token`` (S·T contiguous float32), written into ``out`` when given. ``a`` and ``b``: each
        term's vectors, contiguous float32 rows ``(S, T)`` and columns ``(S, I)`` (see ``ks_count``)."""
        s, t_len, width = x.shape
        n = self.size
        pointers = ctypes.c_void_p * n
        kernel, below, nonfinite = _outputs(out, [(n,), (n,), ()], torch.int64)
        threads = torch.get_num_threads()
        scratch = _scratch_ptr(lib.ks_count_scratch(DTYPES[x.dtype], s, width, self.ncol, self.nsep, threads))
        lib.ks_count(
            x.data_ptr(), DTYPES[x.dtype], s, t_len, width, token.data_ptr(), n, self.kinds,
            pointers(*map(_ptr, a)), pointers(*map(_ptr, b)), self.qmax, self.below_qmax, STEP_FLOOR,
            kernel.data_ptr(), below.data_ptr(), nonfinite.data_ptr(), threads, scratch,
        )
        return kernel, below, nonfinite


def count(lib: ctypes.CDLL, x: torch.Tensor, token: torch.Tensor, kinds: list[int], a: list[torch.Tensor | None],
          b: list[torch.Tensor | None], qmax: list[float], below_qmax: list[float], out=None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`CountPlan.run` for terms given by ``kinds``, ``qmax`` and ``below_qmax`` (0: no
    below-per-token count)."""
    return CountPlan(kinds, qmax, below_qmax).run(lib, x, token, a, b, out)
