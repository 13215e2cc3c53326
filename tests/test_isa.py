"""The C++ kernels at every CPU ISA level built here (ttsearch._C_<level>, see ttsearch/ops/cpu_isa.py).

A process imports one level's module, so each level runs in a subprocess: this file run as
a script with TTSEARCH_CPU_ISA forced and TTSEARCH_OPS=fast, comparing every C++ op with
its reference body. Levels this CPU lacks are skipped with the reason; forcing one, or an
unknown level, fails with a message naming the levels at hand.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ttsearch.ops import cpu_isa

LEVELS = list(cpu_isa.levels())
RUNNABLE = cpu_isa.runnable()
REFERENCE_RUN = os.environ.get("TTSEARCH_OPS") == "reference"
BUILT = [] if REFERENCE_RUN else cpu_isa.built()
# What each level's flags must select in cpu_utils.h (the module reports it)
CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512", "avx512_bf16": "AVX512", "sve256": "SVE256"}


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=600)


def skip_unless_runnable_and_built(level: str) -> None:
    if level not in RUNNABLE:
        pytest.skip(f"this CPU lacks {', '.join(cpu_isa.missing(level))}, which level {level} needs")
    if REFERENCE_RUN:
        pytest.skip("a pure-Python run, chosen on purpose")
    if level not in BUILT:
        pytest.skip(f"ttsearch._C_{level} was not built (TTSEARCH_CPU_ISAS at build time left it out)")


@pytest.mark.parametrize("level", LEVELS)
def test_level_matches_the_reference(level):
    skip_unless_runnable_and_built(level)
    out = run_python([__file__, level], {"TTSEARCH_OPS": "fast", "TTSEARCH_CPU_ISA": level})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[-1] == "ok"


@pytest.mark.parametrize("level", [level for level in LEVELS if level not in RUNNABLE])
def test_forcing_a_level_this_cpu_lacks_fails(level):
    out = run_python(["-c", "import ttsearch.ops"], {"TTSEARCH_OPS": "fast", "TTSEARCH_CPU_ISA": level})
    assert out.returncode != 0
    assert f"TTSEARCH_CPU_ISA={level!r}: this CPU lacks" in out.stderr
    assert f"this CPU runs {', '.join(RUNNABLE)}" in out.stderr


def test_forcing_an_unknown_level_fails_even_in_auto_mode():
    out = run_python(["-c", "import ttsearch.ops"], {"TTSEARCH_OPS": "auto", "TTSEARCH_CPU_ISA": "avx9000"})
    assert out.returncode != 0
    assert f"TTSEARCH_CPU_ISA='avx9000': not an ISA level on {cpu_isa.arch()} (levels: {', '.join(LEVELS)})" in out.stderr


@pytest.mark.parametrize("can", [["avx2", "default"], ["avx512_bf16", "avx512", "avx2", "default"], ["default"]])
def test_a_local_install_builds_what_this_cpu_runs_and_a_wheel_every_level(monkeypatch, can):
    monkeypatch.setattr(cpu_isa, "arch", lambda: "x86_64")
    monkeypatch.setattr(cpu_isa, "runnable", lambda: can)
    every = list(cpu_isa.LEVELS["x86_64"])
    assert cpu_isa.levels_to_build(None, local=True) == can  # the baseline is runnable everywhere
    assert cpu_isa.levels_to_build(None, local=False) == every
    assert cpu_isa.levels_to_build("all", local=True) == every
    assert cpu_isa.levels_to_build("default,avx2", local=False) == ["avx2", "default"]


def test_a_local_install_keeps_the_baseline_even_where_the_cpu_runs_nothing_else(monkeypatch):
    monkeypatch.setattr(cpu_isa, "arch", lambda: "aarch64")
    monkeypatch.setattr(cpu_isa, "runnable", lambda: [])
    assert cpu_isa.levels_to_build(None, local=True) == ["default"]


def test_building_an_unknown_level_fails_naming_the_levels(monkeypatch):
    monkeypatch.setattr(cpu_isa, "arch", lambda: "x86_64")
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['avx9000'\]; x86_64 has \['avx512_bf16'"):
        cpu_isa.levels_to_build("avx2,avx9000", local=True)


def vector_instructions(level: str) -> set[str]:
    """The register files the module's code touches: xmm/ymm/zmm in VEX/EVEX-encoded
    (AVX) instructions, 'xmm16+' (EVEX only) and 'k' (AVX-512 masks); and the bf16 and int8 dots."""
    path = importlib.util.find_spec(f"ttsearch._C_{level}").origin
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    found = set()
    for mnemonic, operands in re.findall(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", text, re.M):
        if mnemonic.startswith("v") and re.search(r"%[xyz]mm", operands):
            found.update(re.findall(r"%([xyz]mm)", operands))
        if re.search(r"%[xy]mm(1[6-9]|2\d|3[01])\b", operands):
            found.add("xmm16+")
        if re.search(r"%k[0-7]\b", operands):
            found.add("k")
        for dot in ("vdpbf16ps", "vpdpbusd"):  # the bf16 and the int8 (VNNI) dot products
            if mnemonic.startswith(dot):
                found.add(dot)
    return found


@pytest.mark.skipif(cpu_isa.arch() != "x86_64" or not shutil.which("objdump"), reason="x86-64 with objdump only")
@pytest.mark.parametrize("level", LEVELS)
def test_a_module_holds_no_instructions_above_its_level(level):
    """The portability promise, checked on the binary: 'default' has no AVX at all, 'avx2'
    no AVX-512; the AVX-512 levels do use it (their flags took effect)."""
    if level not in BUILT:
        pytest.skip(f"ttsearch._C_{level} was not built")
    found = vector_instructions(level)
    if level == "default":
        assert not found, f"AVX instructions in the baseline module: {sorted(found)}"
    elif level == "avx2":
        assert "ymm" in found and not found & {"zmm", "xmm16+", "k", "vdpbf16ps"}, sorted(found)
    else:
        widest = level == "avx512_bf16"
        assert "zmm" in found and ("vdpbf16ps" in found) == widest and ("vpdpbusd" in found) == widest, sorted(found)


# ----------------------------------------------------------------------------- the subprocess


class OneThread:
    """``module``'s functions, each call run on one thread. The oracle runs so: in about 1
    process of 40 on a 2-core Xeon, torch's two-threaded float32 path gave the reference's
    first cascade result 1.9e-5 off its later ones (TTSEARCH_OPS=reference, no ttsearch
    kernel loaded; never on one thread), which would fail a level for the oracle's fault."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def on_one_thread(*args, **kwargs):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)

        return on_one_thread if callable(fn) else fn


def check_level(level: str) -> None:
    """Every C++ op of ``level`` against its reference body, float32 tight and bfloat16 looser."""
    import ops_cases as t  # tests/ is sys.path[0]: this file runs as a script

    import ttsearch.ops as ops
    from ttsearch.aggregation import AGGREGATIONS
    from ttsearch.ops import reference as reference_module

    reference = OneThread(reference_module)

    assert ops.IMPLEMENTATIONS["cpu"] == f"cpp-{level}", ops.IMPLEMENTATIONS
    loaded = sorted(name for name in sys.modules if name.startswith("ttsearch._C"))
    assert loaded == [f"ttsearch._C_{level}"], f"exactly one level's module loads, got {loaded}"
    module = sys.modules[f"ttsearch._C_{level}"]
    assert module.CPU_CAPABILITY == CAPABILITY[level] and module.BF16_DOT == (level == "avx512_bf16"), \
        (module.CPU_CAPABILITY, module.BF16_DOT)

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # t.assert_close: 1e-5 for float32, 2e-2 for bfloat16
        for head_dim, (heads, kv_heads) in ((64, t.HEADS["gqa3"]), (128, t.HEADS["gqa4"]), (32, t.HEADS["gqa8"])):
            ctx = [33, 1, 100, 16, 5, 64, 31, 700]  # 700: a context long enough to be split
            k_cache, v_cache, tables, clean, lens = t.make_paged(ctx, kv_heads, head_dim, dtype)
            scale = head_dim**-0.5
            query = torch.randn(len(ctx), heads, head_dim).to(dtype)
            t.assert_close(ops.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale),
                           reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, scale))
            q_lens = t.query_lens_for(ctx)
            starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
            query = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
            t.assert_close(ops.paged_extend_attention(query, k_cache, v_cache, tables, starts, lens, scale),
                           reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, scale))
            for groups, ungrouped, depth in (
                (*t.CASCADES["mixed"], None), t.CASCADE_TREES["problems"], t.CASCADE_TREES["deep"]
            ):
                args, _, _ = t.make_cascade(groups, ungrouped, kv_heads, head_dim, dtype, levels=depth)
                query = torch.randn(len(args["context_lens"]), heads, head_dim).to(dtype)
                t.assert_close(ops.cascade_decode_attention(*t.cascade_args(args, query, scale)),
                               reference.cascade_decode_attention(*t.cascade_args(args, query, scale)))

        for num_tokens, kv_heads, head_dim in ((7, 3, 64), (33, 2, 128)):
            key, value, k_cache, v_cache, slots = t.store_kv_inputs(num_tokens, kv_heads, head_dim, dtype, torch.int64)
            k_expected, v_expected = k_cache.clone(), v_cache.clone()
            ops.store_kv(key, value, k_cache, v_cache, slots)
            reference.store_kv(key, value, k_expected, v_expected, slots)
            assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)

        kv_cache = torch.randn(2, 3, 12, t.BLOCK, 3, 64).to(dtype)
        src, dst = torch.tensor([1, 2, 5, 4]), torch.tensor([2, 3, 1, 0])
        expected = kv_cache.clone()
        ops.copy_blocks(kv_cache, src, dst)
        reference.copy_blocks(expected, src, dst)
        assert torch.equal(kv_cache, expected)

        for num_rows, width in ((7, 1000), (64, 576)):
            for rows, positive_index in ((2, 1), (1, 0)):
                hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = t.prm_inputs(
                    num_rows, width, rows, dtype, seed=num_rows)
                for aggregation in AGGREGATIONS:
                    args = (hidden, norm_weight, 1e-5, head_weight, head_bias, positive_index, prev_agg, prev_count,
                            aggregation)
                    for actual, expected in zip(ops.prm_step_score(*args), reference.prm_step_score(*args)):
                        assert (actual - expected).abs().max() <= t.TOL[dtype], (num_rows, width, aggregation)

    import test_ops_quantized as q  # every format through both paths of the quantized products

    for qtype in q.FORMATS:
        for rows in (1, 5, 8, 9, 40):
            for dtype in (torch.float32, torch.bfloat16):
                q.test_the_kernels_match_the_reference("cpp", rows, qtype, dtype, None)
    for qtype in ("q8_0", "q4_1"):
        for rows in (2, 12):
            q.test_the_kernel_rounds_x_as_the_contract_says(qtype, rows)

    import test_ops_elementwise as e  # the fused ops' own checks, run on this level's kernels
    import test_ops_sampling as s

    for dtype in e.DTYPES:
        for check in (e.test_rms_norm, e.test_fused_add_rms_norm, e.test_rotary_embedding, e.test_silu_and_mul):
            check("cpp", dtype)
    s.check_sampling("cpp", s.sampling_batch(64, s.SMOLLM2_VOCAB, seed=11))
    for dtype in (torch.bfloat16, torch.float16):
        s.test_sample_tokens_widens_half_logits("cpp", dtype)
    print("ok")


if __name__ == "__main__":
    check_level(sys.argv[1])
