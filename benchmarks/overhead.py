"""What kernelscope's passes cost beside the bare forward pass, measured in one process.

    python benchmarks/overhead.py  # everything, on the demo model (~25 minutes on 2 cores)
    python benchmarks/overhead.py --sections overhead  # only the main ratios
    python benchmarks/overhead.py --sections overhead --formats --schemes w8a8-per-token,fp8,mxfp4,nvfp4
    python benchmarks/overhead.py --sections overhead --transforms 'hadamard;none,hadamard' --schemes fp
    # the cost alone
    python benchmarks/overhead.py --sections overhead --clock cpu --threads 1 --runs 'profile, 4$'

Sections:
  own       inside one profile run, the CPU seconds of the model's forward passes and of kernelscope's own
            work beside them (the default set; with --formats-like sets and --transforms), and their
            ratio: a figure that a machine's changing speed moves far less than a ratio of two runs;
  overhead  profile (1, 4 = the default set, 8 configurations; the default set without the weight
            kernels; with --formats, the default set and the 8 other formats; with --transforms, the
            default set counted in each basis given) / bare forward, and
            evaluation with
            fake quantization / fp evaluation, on --nsamples x --seqlen windows;
  scaling   profile / bare forward and tokens per second from 1 to 16 windows and 512 to 4096 tokens;
  memory    peak RSS of a profile / peak RSS of the bare forward, each in a fresh process, from 1 to
            16 windows, after a short warm-up run; the peak is reset before the run (Linux), so it is
            the run's own; the median of --memory-repeat processes. Beside it, the same with glibc
            told to map every block above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_, in the child
            processes only), so that a freed block leaves RSS at once: the peak of the memory in use,
            without the heap the allocator keeps, which moves a single process's peak by tens of MiB.

Each time is the best of ``--repeat`` rounds; a round runs each thing compared once, side by side,
so that machine noise hits them alike. Beside the ratio of the best times, each ratio is also given
within each round (median and range): on a shared machine one pair of runs can stray by several
percent either way. Compare ratios across machines, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import kernelscope as ks
from kernelscope import element
from kernelscope.models import select_linear_layers
from kernelscope.quant import expand_configs
from kernelscope.quant.transforms import parse_transforms
from kernelscope.runs.evaluate import run_scheme
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.runs.schemes import parse_scheme

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "test.txt"

CONFIG_SETS = {
    1: expand_configs(["per_token"], [8], []),
    4: ks.default_configs(),
    8: expand_configs(["per_token", "crossquant", "per_tensor", "per_channel"], [8, 4], [0.15]),
}
FORMAT_SET = ks.default_configs() + expand_configs(
    ["per_group", "fp8_per_token", "fp8_per_tensor", "mxfp8", "mxfp4", "mxfp4_rceil", "nvfp4"], [8, 4], [])
"""The default set and every other format of the registry: 4 + 8 configurations."""


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def rounds(runs: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds of each run in each of ``repeat`` rounds; a round runs every thing compared once."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return times


def paired(times: dict[str, list[float]], name: str, against: str) -> str:
    """The ratio of ``name`` to ``against`` within each round, as median (lowest-highest; the lower
    middle for an even count): how far one pair of runs side by side can stray from the ratio of
    the best times on this machine."""
    ratios = sorted(a / b for a, b in zip(times[name], times[against], strict=True))
    return f"{ratios[(len(ratios) - 1) // 2]:.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.loaded = ks.load_model(args.model)
        self.model = self.loaded.model
        self.ids = ks.tokenize(self.loaded.tokenizer, ks.load_text(args.dataset).text)
        self.layers = select_linear_layers(self.model)

    def windows(self, n: int, seqlen: int):
        return ks.make_windows(self.ids, seqlen, n)

    def bare(self, windows) -> None:
        with eval_mode(self.model):
            for i in range(len(windows)):
                forward_windows(self.model, windows.tokens[i : i + 1])

    def profile(self, windows, configs, **options) -> None:
        ks.profile(self.model, windows, configs, layers=self.layers, **options)


def section_overhead(b: Bench, out: list[str]) -> None:
    a = b.args
    windows = b.windows(a.nsamples, a.seqlen)
    tokens = len(windows) * windows.seqlen
    b.profile(windows, CONFIG_SETS[8])  # warm-up: load the native statistics before timing
    runs = {"bare forward": lambda: b.bare(windows)}
    for n, configs in CONFIG_SETS.items():
        runs[f"profile, {n} configuration{'s' * (n > 1)}"] = lambda c=configs: b.profile(windows, c)
    runs["profile, 4, no weight kernels"] = lambda: b.profile(windows, CONFIG_SETS[4], weight_formats=())
    if a.formats:
        runs["profile, 4 + 8 formats"] = lambda: b.profile(windows, FORMAT_SET)
    for text in filter(None, a.transforms.split(";")):
        specs = parse_transforms(text.split(","))
        runs[f"profile, 4, {' + '.join(t.label for t in specs)}"] = (
            lambda t=specs: b.profile(windows, CONFIG_SETS[4], transforms=t))
    fp = parse_scheme("fp")
    runs["eval fp"] = lambda: run_scheme(b.model, windows, fp, b.layers)
    for name in a.schemes.split(","):
        scheme = parse_scheme(name)
        runs[f"eval {scheme.name}"] = lambda s=scheme: run_scheme(b.model, windows, s, b.layers)
    if a.runs:
        runs = {name: fn for name, fn in runs.items()
                if name in ("bare forward", "eval fp") or re.search(a.runs, name)}
    times = rounds(runs, a.repeat)
    best = {name: min(t) for name, t in times.items()}
    out.append(f"\n## overhead: {windows.describe()}; {a.clock} seconds, best of {a.repeat}, and the ratio "
               "within each round")
    out.append(f"{'':34s} {'best s':>8s} {'tok/s':>8s}  {'best ratio':>10s} "
               f"{'per round: median (range)':>26s}")
    for name, seconds in best.items():
        against = "eval fp" if name.startswith("eval ") else "bare forward"
        out.append(f"{name:34s} {seconds:8.2f} {tokens / seconds:8.0f}  {seconds / best[against]:9.3f}x "
                   f"{'' if name == against else paired(times, name, against):>26s}  vs {against}")


class _Clocked:
    """CPU seconds spent in ``owner.name`` while installed (a ``with`` block)."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name, self.seconds = owner, name, 0.0

    def __enter__(self):
        real = self.real = getattr(self.owner, self.name)

        def clocked(*args, **kwargs):
            start = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start

        setattr(self.owner, self.name, clocked)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.name, self.real)


def section_own(b: Bench, out: list[str]) -> None:
    """Inside one profile run: CPU seconds of the model's own forward passes, and of all the rest (what
    the hooks measure, the summaries after each pass, the tables and the weight kernels): the ratio
    (forward + rest) / forward is the profile's cost over the bare forward, both read in the same run,
    so that a machine that slows down for a while slows both alike."""
    from kernelscope.runs import profiling

    a = b.args
    windows = b.windows(a.nsamples, a.seqlen)
    cases = {"4 configurations": (CONFIG_SETS[4], ()), "4 + 8 formats": (FORMAT_SET, ())}
    for text in filter(None, a.transforms.split(";")):
        specs = parse_transforms(text.split(","))
        cases[f"4, {' + '.join(t.label for t in specs)}"] = (CONFIG_SETS[4], specs)
    b.profile(windows, CONFIG_SETS[8])  # warm-up
    out.append(f"\n## own work inside a profile: {windows.describe()}; CPU seconds, "
               f"{torch.get_num_threads()} thread(s), best of {a.repeat}")
    out.append(f"{'':34s} {'total':>8s} {'forward':>8s} {'the rest':>9s} {'ratio':>7s}")
    for name, (configs, specs) in cases.items():
        best = None
        for _ in range(a.repeat):
            with (_Clocked(profiling, "forward_windows") as forward,
                  _Clocked(profiling.Observer, "__call__") as hooks):
                start = time.process_time()
                b.profile(windows, configs, **({"transforms": specs} if specs else {}))
                total = time.process_time() - start
            model = forward.seconds - hooks.seconds
            if best is None or total / model < best[0] / best[1]:
                best = (total, model)
        total, model = best
        out.append(f"profile, {name:25s} {total:8.2f} {model:8.2f} {total - model:9.2f} "
                   f"{total / model:6.3f}x")


def section_scaling(b: Bench, out: list[str]) -> None:
    a = b.args
    out.append(f"\n## scaling: profile (default set) / bare forward; best of {a.repeat}")
    out.append(f"{'windows x tokens':18s} {'bare s':>8s} {'profile s':>10s} {'ratio':>7s} "
               f"{'profile tok/s':>14s} {'per round: median (range)':>26s}")
    shapes = [(n, 512) for n in (1, 4, 16)] + [(1, s) for s in (1024, 2048, 4096)]
    for n, seqlen in shapes:
        windows = b.windows(n, seqlen)
        times = rounds({"bare": lambda w=windows: b.bare(w),
                        "profile": lambda w=windows: b.profile(w, CONFIG_SETS[4])}, a.repeat)
        best = {name: min(t) for name, t in times.items()}
        tokens = n * seqlen
        out.append(f"{f'{n} x {seqlen}':18s} {best['bare']:8.2f} {best['profile']:10.2f} "
                   f"{best['profile'] / best['bare']:7.3f} {tokens / best['profile']:14.0f} "
                   f"{paired(times, 'profile', 'bare'):>26s}")


def section_memory(b: Bench, out: list[str]) -> None:
    a = b.args
    out.append(f"\n## memory: peak RSS during the run, each in a fresh process, {a.seqlen}-token windows;")
    out.append(f"median of {a.memory_repeat} processes each (the allocator's retained heap moves a single")
    out.append("process's peak by tens of MiB either way), after a 64-token warm-up in the same process;")
    out.append("'warm-up +MiB' is what that warm-up added to the profile's process: mostly the code of the")
    out.append("libraries it uses (the table library's, torch's statistics operations), paged in once and")
    out.append("resident from then on; it counts in the profile's peak. The last three columns: the peak of")
    out.append("the memory in use (glibc maps every block above 64 KiB on its own and frees it at once), "
               f"median of {a.live_repeat}")
    out.append(f"{'windows':8s} {'start MiB':>10s} {'bare peak':>10s} {'profile peak':>13s} {'ratio':>7s} "
               f"{'bare +MiB':>14s} {'profile +MiB':>14s} {'warm-up +MiB':>13s} {'in use: ratio':>14s} "
               f"{'bare +MiB':>10s} {'profile +MiB':>13s}")
    for n in (1, 4, 16):
        runs = _children(a, n, a.memory_repeat, {})
        live = _children(a, n, a.live_repeat, {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
        bare, prof = (_median_run(runs[what]) for what in ("bare", "profile"))
        spread = {what: _spread([r["peak_mib"] - r["before_mib"] for r in runs[what]]) for what in runs}
        live_bare, live_prof = (_median_run(live[what]) for what in ("bare", "profile"))
        out.append(f"{n:<8d} {bare['before_mib']:10.0f} {bare['peak_mib']:10.0f} {prof['peak_mib']:13.0f} "
                   f"{prof['peak_mib'] / bare['peak_mib']:7.3f} {spread['bare']:>14s} "
                   f"{spread['profile']:>14s} "
                   f"{prof['warmup_mib']:13.0f} {live_prof['peak_mib'] / live_bare['peak_mib']:14.3f} "
                   f"{live_bare['peak_mib'] - live_bare['before_mib']:10.0f} "
                   f"{live_prof['peak_mib'] - live_prof['before_mib']:13.0f}")


def _children(a, n: int, repeat: int, env: dict[str, str]) -> dict[str, list[dict]]:
    """``repeat`` fresh processes of each run (bare, profile) on ``n`` windows, alternating; what
    each printed. ``env`` is added to the children's environment only."""
    runs: dict[str, list[dict]] = {"bare": [], "profile": []}
    for _ in range(repeat):
        for what in runs:
            cmd = [sys.executable, __file__, "--child", what, "--model", a.model, "--dataset", a.dataset,
                   "--nsamples", str(n), "--seqlen", str(a.seqlen)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
            runs[what].append(json.loads(done.stdout))
    return runs


def _median_run(runs: list[dict]) -> dict:
    """The run with the median peak (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["peak_mib"])[(len(runs) - 1) // 2]


def _spread(values: list[float]) -> str:
    """Median and range of a few MiB figures, e.g. ``107 (78-138)``."""
    ordered = sorted(values)
    return f"{ordered[(len(ordered) - 1) // 2]:.0f} ({ordered[0]:.0f}-{ordered[-1]:.0f})"


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    """One run in this fresh process; prints, as JSON, the resident memory before the run and its
    peak during the run (the peak counter is reset after loading, which peaks higher on its own)."""
    b = Bench(args)
    windows = b.windows(args.nsamples, args.seqlen)
    run = b.bare if args.child == "bare" else lambda w: b.profile(w, CONFIG_SETS[4])
    loaded = _status_mib("VmRSS")
    run(b.windows(1, 64))  # warm-up: first-use allocations, the native statistics' library
    warm = _status_mib("VmRSS")
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    run(windows)
    print(json.dumps({"warmup_mib": warm - loaded, "before_mib": before, "peak_mib": _status_mib("VmHWM")}))


def _settle() -> None:
    """Free what is garbage and hand freed heap back to the OS, so both runs start alike."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _shown(dataset: str) -> str:
    """A text file as a path relative to the working folder (no machine's absolute paths in output)."""
    path = Path(dataset)
    return os.path.relpath(path) if path.is_file() else dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default=str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "pydoc")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each thing compared (best is kept)")
    parser.add_argument("--memory-repeat", type=int, default=3,
                        help="fresh processes per memory figure (median)")
    parser.add_argument("--live-repeat", type=int, default=1,
                        help="fresh processes per memory-in-use figure (median); it moves by a few MiB "
                             "at most")
    parser.add_argument("--schemes", default="w8a8-per-token,w8a8-crossquant,remove-kernel-per-token")
    parser.add_argument("--sections", default="overhead,scaling,memory")
    parser.add_argument("--formats", action="store_true",
                        help="also time a profile of the default set with every other format of the registry")
    parser.add_argument("--transforms", default="",
                        help="profiles of the default set under these transforms to time too, ';' between "
                             "profiles, ',' between the transforms of one: 'hadamard;none,hadamard'")
    parser.add_argument("--runs", default="", help="overhead: only the runs whose name matches this regular "
                        "expression (and the bare forward and fp evaluation they are compared with)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall seconds, or the process's CPU seconds (steadier on a shared machine; with "
                             "--threads 1 the cost of the work itself)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (the native statistics use as many)")
    parser.add_argument("--child", choices=["bare", "profile"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    b = Bench(args)
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} cores visible)" if names else cpu
    out = [(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"statistics {element.describe()}"),
           f"model: {b.loaded.info['path']}, {b.loaded.info['dtype']}; text: {_shown(args.dataset)}"]
    for section in args.sections.split(","):
        {"overhead": section_overhead, "own": section_own, "scaling": section_scaling,
         "memory": section_memory}[section](b, out)
        print("\n".join(out), flush=True)
        out.clear()


if __name__ == "__main__":
    main()
