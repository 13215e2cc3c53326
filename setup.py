"""Builds csrc/ into the extension ttsearch._C.

A build that fails (no compiler, no torch at build time, a compile error) fails the install
with the compiler's message: the fast path never goes missing by accident. A pure-Python
install is a choice: ``TTSEARCH_NO_EXTENSION=1`` skips the extension, and the ops then run
on their pure-torch reference bodies (run with ``TTSEARCH_OPS=reference`` to say so).
"""

import glob
import os

from setuptools import setup

SOURCES = sorted(glob.glob("csrc/*.cpp"))


def extensions():
    if not SOURCES or os.environ.get("TTSEARCH_NO_EXTENSION"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        raise SystemExit(
            "building ttsearch._C needs torch at build time: install torch first and build without isolation "
            "(pip install --no-build-isolation ...), or set TTSEARCH_NO_EXTENSION=1 for a pure-Python install"
        ) from exc

    flags = ["-O3", "-fopenmp", "-march=native", "-std=c++20"]
    ext = CppExtension(
        "ttsearch._C",
        SOURCES,
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
