"""Builds csrc/ into the extension ttsearch._C; installs pure Python if it cannot.

Without a C++ compiler (or without torch at build time) the package still installs and
the ops run on their pure-torch reference bodies, with one warning at import.
"""

import glob
import os
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

SOURCES = sorted(glob.glob("csrc/*.cpp"))


class OptionalBuildExt(build_ext):
    """A failed C++ build is a warning, not a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            warnings.warn(f"ttsearch._C was not built ({exc}); ops will use the torch reference")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            warnings.warn(f"ttsearch._C was not built ({exc}); ops will use the torch reference")


def extensions():
    if not SOURCES or os.environ.get("TTSEARCH_NO_EXTENSION"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("torch is not importable at build time: installing without ttsearch._C", file=sys.stderr)
        return [], {}

    class Build(OptionalBuildExt, BuildExtension):
        pass

    flags = ["-O3", "-fopenmp", "-march=native", "-std=c++20"]
    ext = CppExtension(
        "ttsearch._C",
        SOURCES,
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": Build.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
