"""The CPU ISA levels of the C++ kernels: how setup.py builds each, and which one this CPU runs.

setup.py compiles csrc/ once per level of the build machine's architecture into
``ttsearch._C_<level>``, with that level's explicit flags, never ``-march=native``: a wheel
built on one CPU must not die with an illegal instruction on another. Every module
registers the same CPU kernels, so a process imports exactly one: the widest level the CPU
supports and the install holds, or the one ``TTSEARCH_CPU_ISA`` names.

Plain Python without imports of torch or ttsearch at module level: setup.py loads this file
by path to read ``levels()``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform

_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
_AVX2_CPU = ("avx2", "fma3", "f16c")
_AVX512_CPU = (*_AVX2_CPU, "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq")

#: per architecture, widest first: level -> (compiler flags, the CPU features it needs, named
#: as torch.cpu.get_capabilities() names them). The x86 levels start from the baseline
#: -march=x86-64, which also overrides any -march in CFLAGS.
LEVELS: dict[str, dict[str, tuple[list[str], tuple[str, ...]]]] = {
    "x86_64": {
        # every CPU with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) also has AVX512_VNNI
        "avx512_bf16": (["-march=x86-64", *_AVX512, "-mavx512bf16", "-mavx512vnni"],
                        (*_AVX512_CPU, "avx512_bf16", "avx512_vnni")),
        "avx512": (["-march=x86-64", *_AVX512], _AVX512_CPU),
        "avx2": (["-march=x86-64", *_AVX2], _AVX2_CPU),
        "default": (["-march=x86-64"], ()),
    },
    "aarch64": {
        # torch's own SVE256 flags; the level runs where torch itself chose its SVE256 kernels
        "sve256": (["-march=armv8-a+sve+bf16", "-D__ARM_FEATURE_BF16", "-msve-vector-bits=256"], ("torch:SVE256",)),
        "default": (["-march=armv8-a"], ()),  # NEON
    },
}

# /proc/cpuinfo's names for the features above that it spells differently
_PROC_NAMES = {"fma3": "fma", "avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_vl": "avx512vl",
               "avx512_dq": "avx512dq"}


def arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def levels() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """This architecture's levels, widest first; elsewhere one portable level."""
    return LEVELS.get(arch(), {"default": ([], ())})


@functools.cache
def cpu_features() -> frozenset[str]:
    import torch

    try:
        have = {name for name, on in torch.cpu.get_capabilities().items() if on is True}
    except AttributeError:  # a torch without get_capabilities: the kernel's flags
        with open("/proc/cpuinfo") as f:
            flags = {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
        needed = {need for _, needs in levels().values() for need in needs}
        have = {need for need in needed if _PROC_NAMES.get(need, need) in flags}
    have.add(f"torch:{torch.backends.cpu.get_cpu_capability()}")
    return frozenset(have)


def multiplies_int8(level: str) -> bool:
    """Whether ``level``'s ``quantized_linear`` takes many rows through its int8 GEMM (built
    where the level has AVX512-VNNI); other levels dequantize panels of W for ATen's GEMM."""
    return "avx512_vnni" in levels().get(level, ([], ()))[1]


def has_amx() -> bool:
    return "amx_bf16" in cpu_features()


def has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512_BF16): elsewhere bf16
    GEMMs are emulated, several times slower than float32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_features())


def missing(level: str) -> list[str]:
    """The CPU features ``level`` needs that this CPU lacks."""
    have = cpu_features()
    return [need for need in levels()[level][1] if need not in have]


def runnable() -> list[str]:
    """The levels this CPU can run, widest first."""
    return [level for level in levels() if not missing(level)]


def levels_to_build(wanted: str | None, local: bool) -> list[str]:
    """The levels a build compiles, widest first. ``wanted`` (TTSEARCH_CPU_ISAS) names them,
    comma-separated, or is 'all'; without it a wheel or sdist build takes every level, so the
    wheel runs on any CPU of the architecture, and a local (editable) install only the levels
    this CPU runs plus the portable baseline (the narrowest level), which is quicker."""
    every = list(levels())
    if wanted and wanted != "all":
        names = wanted.split(",")
        unknown = sorted(set(names) - set(every))
        if unknown:
            raise ValueError(f"TTSEARCH_CPU_ISAS: unknown level(s) {unknown}; {arch()} has {every} (or 'all')")
        return [level for level in every if level in names]
    if wanted or not local:
        return every
    can = runnable()
    return [level for level in every if level in can or level == every[-1]]


def built() -> list[str]:
    """The levels this install holds a module for, widest first."""
    return [level for level in levels() if importlib.util.find_spec(f"ttsearch._C_{level}") is not None]


def load() -> str:
    """Imports the module of the chosen level, which registers its CPU kernels; returns the level.

    ValueError if TTSEARCH_CPU_ISA names a level that is unknown, that this CPU lacks or
    that was not built (a forced level never falls back); ImportError if no module this CPU
    runs was built.
    """
    can, have = runnable(), built()
    forced = os.environ.get("TTSEARCH_CPU_ISA")
    if forced:
        if forced not in levels():
            why = f"not an ISA level on {arch()} (levels: {', '.join(levels())})"
        elif forced not in can:
            why = f"this CPU lacks {', '.join(missing(forced))}"
        elif forced not in have:
            why = f"ttsearch._C_{forced} was not built"
        else:
            why = None
        if why:
            raise ValueError(f"TTSEARCH_CPU_ISA={forced!r}: {why}; this CPU runs {', '.join(can)}; "
                             f"built: {', '.join(have) or 'none'}")
        level = forced
    else:
        level = next((level for level in can if level in have), None)
        if level is None:
            raise ImportError(f"no ttsearch._C_<isa> module that this CPU runs was built (it runs {', '.join(can)}; "
                              f"built: {', '.join(have) or 'none'})")
    importlib.import_module(f"ttsearch._C_{level}")
    return level
