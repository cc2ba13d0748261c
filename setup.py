"""Builds the CPU library of the per-element work (``kernelscope/element/native.c``: the statistics'
two passes and fake quantization) when kernelscope is built or installed (``pip install .``,
``pip install -e .``, a wheel), into ``kernelscope/element/``; everything else is in pyproject.toml.

The library is a plain shared object that :mod:`kernelscope.element.native` loads with ctypes: it has
no Python entry point, so no ``PyInit`` symbol is exported or needed. Its build is optional: where
no C compiler works, the package installs without it and the per-element work runs as torch code
(the same integers and tensors, more slowly); :data:`kernelscope.element.native.failure` says why.

Instruction sets. ``-march=native`` would tie the library to the CPU that built it, and a wheel (or
a folder shared between machines) runs on others, where such a build stops with an illegal
instruction. So on x86-64 three libraries are built, each for an instruction-set level every CPU of
that level runs: the compiler's baseline (``_native.so``), ``x86-64-v3`` (AVX2, FMA, BMI2) and
``x86-64-v4`` (AVX-512), and the loader takes the highest level the running CPU has. The levels
matter: the counting loops run about four times faster with AVX2 than at the baseline (AVX-512 adds
a little more), and the C code has AVX2 and AVX-512 paths of its own. Other architectures get the
baseline build only. ``KERNELSCOPE_NATIVE_ARCH=native`` (or any other ``-march`` value) at build
time builds one library for that target instead, for a machine that builds for itself.

Flags: no fast-math and no contraction into fused multiply-adds, so each float operation stays one
IEEE operation and the counts equal those of the torch code; ``-fno-wrapv`` and ``-g0`` undo what
Python's own CFLAGS add. OpenMP (``-fopenmp``) is used where the compiler can compile and link it,
else ``-fopenmp-simd``, else neither (one thread). Each library carries the flags it was built with
and the SHA-256 of the native.c it was built from (``ks_build_flags``, ``ks_build_source``), so that
the loader can report the one and refuse a library older than the source beside it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

SOURCE = "kernelscope/element/native.c"
PACKAGE = "kernelscope.element"
FLAGS = ["-O3", "-g0", "-fno-fast-math", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
         "-fno-strict-aliasing", "-fno-wrapv"]
THREADS = (["-fopenmp"], ["-fopenmp-simd"], [])
"""Tried in order: the first the compiler compiles and links is used."""
X86_LEVELS = ("x86-64-v3", "x86-64-v4")
ARCH_ENV = "KERNELSCOPE_NATIVE_ARCH"
SUFFIX = ".dll" if os.name == "nt" else ".so"
OPENMP_PROBE = "#include <omp.h>\nint ks_probe(void) { return omp_get_max_threads(); }\n"
PLAIN_PROBE = "int ks_probe(void) { return 1; }\n"


def variants() -> dict[str, str | None]:
    """The libraries to build: extension name -> the ``-march`` target (None: the compiler's default)."""
    chosen = os.environ.get(ARCH_ENV, "").strip()
    if chosen:
        return {f"{PACKAGE}._native": chosen}
    found = {f"{PACKAGE}._native": None}
    if platform.machine().lower() in ("x86_64", "amd64"):
        found.update({f"{PACKAGE}._native_{level.replace('-', '_')}": level for level in X86_LEVELS})
    return found


ARCHS = variants()


def file_name(arch: str | None) -> str:
    """The library's file name in the package: ``_native.so``, ``_native.x86-64-v3.so`` ... A dot in
    the stem keeps Python from taking it for a module (it has no ``PyInit``). A build for a chosen
    ``KERNELSCOPE_NATIVE_ARCH`` takes the plain name: it is the one library, loaded unconditionally."""
    return f"_native.{arch}{SUFFIX}" if arch in X86_LEVELS else f"_native{SUFFIX}"


class BuildNative(build_ext):
    """build_ext for ctypes libraries: probes what the compiler supports, names the files for the
    loader, exports no ``PyInit``, and removes libraries of earlier builds that this one replaces."""

    def run(self) -> None:
        """Remove every library an earlier build left (in the build folder and, for an editable
        install, in the source tree), so that no variant this build drops stays behind; unlinked,
        not overwritten, so a process that has one loaded keeps its copy."""
        folders = [Path(self.build_lib, *PACKAGE.split("."))]
        if self.inplace or self.editable_mode:
            folders.append(Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE)))
        for folder in folders:
            for old in folder.glob(f"_native*{SUFFIX}"):
                old.unlink()
        super().run()

    def get_ext_filename(self, fullname: str) -> str:
        """The library's path below the package root, for the full name or (as distutils also asks)
        the last part of it alone."""
        *package, name = fullname.split(".")
        arch = next((a for n, a in ARCHS.items() if n.rpartition(".")[2] == name), "")
        if arch == "":
            return super().get_ext_filename(fullname)
        return os.path.join(*package, file_name(arch))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return list(ext.export_symbols or [])  # a ctypes library: no PyInit_ to export

    def build_extensions(self) -> None:
        """Decide the flags once for all libraries, then build each that the compiler can target."""
        if self.compiler.compiler_type == "msvc":
            self.warn("the per-element library needs a GCC- or Clang-compatible compiler; it is not built, "
                      "and the statistics and fake quantization run as torch code")
            self.extensions = []
            return
        if not self._compiles(PLAIN_PROBE, []):
            self.warn("no working C compiler: the per-element library is not built, and the statistics and "
                      "fake quantization run as torch code")
            self.extensions = []
            return
        threads = next(flags for flags in THREADS if self._compiles(OPENMP_PROBE if flags == ["-fopenmp"]
                                                                    else PLAIN_PROBE, flags))
        kept = []
        for ext in self.extensions:
            arch = ARCHS.get(ext.name)
            march = [] if arch is None else [f"-march={arch}"]
            if march and not self._compiles(PLAIN_PROBE, march):
                if arch not in X86_LEVELS:
                    raise CompileError(f"{ARCH_ENV}={arch}: the compiler does not accept -march={arch}")
                self.warn(f"the compiler does not accept -march={arch}: that library is not built")
                continue
            ext.extra_compile_args = [*FLAGS, *march, *threads]
            ext.extra_link_args = list(threads)
            ext.sources = [SOURCE, self._build_info(ext, " ".join([*march, *threads]) or "portable")]
            kept.append(ext)
        self.extensions = kept
        self.parallel = None  # one after the other: build_extension below changes build_temp
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        """Build ``ext`` with object files of its own (all libraries compile the same native.c)."""
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name.rpartition(".")[2])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared

    def _compiles(self, code: str, flags: list[str]) -> bool:
        """Whether ``code`` compiles and links into a shared library with ``flags``."""
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "probe.c")
            source.write_text(code)
            try:
                objects = self.compiler.compile([str(source)], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_shared_object(objects, str(Path(tmp, f"probe{SUFFIX}")),
                                                 extra_postargs=flags)
            except (CCompilerError, CompileError, LinkError, OSError):
                return False
        return True

    def _build_info(self, ext: Extension, flags: str) -> str:
        """A C file giving the library's flags and its source's SHA-256, written (only when it
        changes, so that an unchanged build is not redone) in the build's temporary folder."""
        digest = hashlib.sha256(Path(SOURCE).read_bytes()).hexdigest()
        text = ("/* Written by setup.py: how this library was built. */\n"
                f'const char* ks_build_flags(void) {{ return "{flags}"; }}\n'
                f'const char* ks_build_source(void) {{ return "{digest}"; }}\n')
        path = Path(self.build_temp, "build-info", f"{ext.name.rpartition('.')[2]}.c")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        return str(path)


setup(
    ext_modules=[Extension(name, sources=[SOURCE], depends=[SOURCE], optional=True) for name in ARCHS],
    cmdclass={"build_ext": BuildNative},
)
