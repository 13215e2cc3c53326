"""Builds csrc/ into the extensions ttsearch._C_<level>, one per CPU ISA level.

Every csrc/*.cpp goes into every level's module, compiled with that level's explicit flags
(ttsearch/_cpu_isa.py lists them; never -march=native), so a wheel runs on any CPU of its
architecture: at import, ttsearch.ops loads the widest level the CPU supports. The levels
build side by side, each in its own temp folder, with MAX_JOBS (ninja's workers per level)
defaulting to the cores shared out among them. ``TTSEARCH_CPU_ISAS=avx2,default`` builds
only those levels (a quicker build for development).

A build that fails (no compiler, no torch at build time, a compile error) fails the install
with the compiler's message: the fast path never goes missing by accident. A pure-Python
install is a choice: ``TTSEARCH_NO_EXTENSION=1`` skips the extension, and the ops then run
on their pure-torch reference bodies (run with ``TTSEARCH_OPS=reference`` to say so).
"""

import copy
import glob
import importlib.util
import os

from setuptools import setup

SOURCES = sorted(glob.glob("csrc/*.cpp"))


def isa_levels() -> dict:
    """ttsearch/_cpu_isa.py's levels, read by path: the package is not importable yet."""
    spec = importlib.util.spec_from_file_location("_cpu_isa", os.path.join("ttsearch", "_cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    levels = module.levels()
    wanted = os.environ.get("TTSEARCH_CPU_ISAS")
    if wanted:
        unknown = sorted(set(wanted.split(",")) - set(levels))
        if unknown:
            raise SystemExit(f"TTSEARCH_CPU_ISAS: unknown level(s) {unknown}; this architecture has {list(levels)}")
        levels = {level: build for level, build in levels.items() if level in wanted.split(",")}
    return levels


def extensions():
    if not SOURCES or os.environ.get("TTSEARCH_NO_EXTENSION"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "building ttsearch._C_<isa> needs torch at build time: install torch first and build without isolation "
            "(pip install --no-build-isolation ...), or set TTSEARCH_NO_EXTENSION=1 for a pure-Python install"
        ) from exc

    class BuildLevels(BuildExtension.with_options(no_python_abi_suffix=False)):
        """Builds the levels in parallel threads. They compile the same sources into different
        objects, and torch's ninja build writes its build.ninja into the temp folder: each
        level gets a folder of its own, on a copy of this command."""

        def finalize_options(self):
            super().finalize_options()
            if self.parallel is None:  # unless -j says otherwise
                self.parallel = len(self.extensions)

        def build_extension(self, ext):
            level_cmd = copy.copy(self)
            level_cmd.build_temp = os.path.join(self.build_temp, ext.name.rpartition(".")[2])
            super(BuildLevels, level_cmd).build_extension(ext)

    levels = isa_levels()
    # ninja runs MAX_JOBS compiles per level; the levels run at once: share the cores out
    os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 1) // len(levels))))
    exts = []
    for level, (flags, _) in levels.items():
        # -g0: Python's CFLAGS ask for debug info, which slows each of the levels' builds
        args = ["-O3", "-g0", "-fopenmp", "-std=c++20", *flags]
        if "-mavx512f" in flags:  # GCC 12 flags its own avx512fintrin.h in ATen's vectors, thousands of lines
            args.append("-Wno-maybe-uninitialized")
        exts.append(CppExtension(f"ttsearch._C_{level}", SOURCES, extra_compile_args=args, extra_link_args=["-fopenmp"]))
    return exts, {"build_ext": BuildLevels}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
