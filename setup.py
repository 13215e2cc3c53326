"""Builds csrc/ into the extensions ttsearch._C_<level>, one per CPU ISA level.

Every csrc/*.cpp goes into every level's module, compiled with that level's explicit flags
(ttsearch/ops/cpu_isa.py lists them; never -march=native), so a wheel runs on any CPU of its
architecture: at import, ttsearch.ops loads the widest level the CPU supports. The levels
build side by side, each in its own temp folder, with MAX_JOBS (ninja's workers per level)
defaulting to the cores shared out among them.

Which levels: a wheel or sdist build (``pip wheel``, ``python -m build``, ``pip install .``)
builds every level of the architecture. A local, editable install (``pip install -e .``, as
``make`` does) builds only the levels this CPU runs plus the portable baseline, and removes
modules of other levels that an earlier build left in the tree. ``TTSEARCH_CPU_ISAS=avx2,default``
builds exactly those levels, and ``TTSEARCH_CPU_ISAS=all`` every level, in either kind of build.
torch's build prepends ccache (or sccache) to the compiler when it is on PATH; the cache is
keyed on paths relative to this folder, so another clone of the repository hits it too.

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


def load_cpu_isa():
    """ttsearch/ops/cpu_isa.py, loaded by path: the package is not importable yet."""
    spec = importlib.util.spec_from_file_location("cpu_isa", os.path.join("ttsearch", "ops", "cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU_ISA = load_cpu_isa()


def level_of(ext) -> str:
    return ext.name.rpartition("._C_")[2]


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

        def build_extensions(self):
            try:
                keep = CPU_ISA.levels_to_build(os.environ.get("TTSEARCH_CPU_ISAS"), local=self.editable_mode)
            except ValueError as exc:
                raise SystemExit(str(exc)) from exc
            # an editable install builds into the tree: a module of a level left out is stale
            for ext in self.extensions if self.editable_mode else []:
                if level_of(ext) not in keep:
                    for stale in glob.glob(os.path.join("ttsearch", f"_C_{level_of(ext)}.*")):
                        os.remove(stale)
            self.extensions = [ext for ext in self.extensions if level_of(ext) in keep]
            if self.parallel is None:  # unless -j says otherwise
                self.parallel = len(self.extensions)
            # ninja runs MAX_JOBS compiles per level; the levels run at once: share the cores out
            os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 1) // len(self.extensions))))
            super().build_extensions()

        def build_extension(self, ext):
            level_cmd = copy.copy(self)
            level_cmd.build_temp = os.path.join(self.build_temp, ext.name.rpartition(".")[2])
            super(BuildLevels, level_cmd).build_extension(ext)

    # ccache keys paths below this folder relative to it: a fresh clone reuses the objects
    os.environ.setdefault("CCACHE_BASEDIR", os.path.dirname(os.path.abspath(__file__)))
    exts = []
    for level, (flags, _) in CPU_ISA.levels().items():  # build_extensions keeps those to build
        # -g0: Python's CFLAGS ask for debug info, which slows each of the levels' builds
        args = ["-O3", "-g0", "-fopenmp", "-std=c++20", *flags]
        if "-mavx512f" in flags:  # GCC 12 flags its own avx512fintrin.h in ATen's vectors, thousands of lines
            args.append("-Wno-maybe-uninitialized")
        exts.append(CppExtension(f"ttsearch._C_{level}", SOURCES, extra_compile_args=args, extra_link_args=["-fopenmp"]))
    return exts, {"build_ext": BuildLevels}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
