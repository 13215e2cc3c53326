"""Compile every Triton kernel for a GPU that is not there, and read what it costs the GPU.

Triton compiles ahead of time for any ``GPUTarget`` with the ptxas inside its own wheel: no
driver and no device are needed (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))``). The kernels are reached through their real launchers, so the specializations
compiled here are the ones a GPU run compiles:

- the launchers get CPU tensors that say they are on a GPU (``GpuLike``: ``is_cuda`` is all
  they branch on) and an H100's SM count for the split-KV heuristic;
- ``JITFunction.run`` is swapped for a recorder of each launch: its bound arguments, as
  the NVIDIA backend specializes them (dtypes, 16-byte alignment, constexprs), its options
  (``num_warps``, ``num_stages``) and its grid;
- each distinct launch is compiled for every target, and the cubin's registers, stack frame
  (where ptxas puts spills) and static shared memory are read with the wheel's cuobjdump;
  dynamic shared memory is Triton's own metadata.

Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``), so a second run only reads
them back. Triton's interpreter must be off when the kernels are imported (they are then
``JITFunction``s, not interpreted twins)::

    python -m ttsearch.kernels.compile_check [--targets 80,90] [--json PATH] [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import subprocess
import tempfile
from typing import Callable, Iterator

import torch

#: SMs of an H100 SXM: the split-KV heuristic's input, so the launches split as they would there
H100_SMS = 132


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int


#: the policies ttsearch is built for (their configs' attention and MLP shapes)
MODELS = (
    ModelShape("smollm2-135m", heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152),
    ModelShape("llama-3.2-1b", heads=32, kv_heads=8, head_dim=64, hidden=2048, intermediate=8192, vocab=128256),
)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TARGETS = (80, 90)


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA programming guide, compute capabilities)."""

    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 233472  # 228 KiB on sm_90, of which a block may take 227 KiB
    shared_per_block: int = 232448
    reserved_shared_per_block: int = 1024  # the CUDA runtime's own, per block


LIMITS = {
    80: SMLimits(shared_bytes=167936, shared_per_block=166912),  # 164 KiB, 163 KiB per block
    90: SMLimits(),
}


class GpuLike(torch.Tensor):
    """A CPU tensor that tells the launchers it is on a GPU: they choose tile shapes and the
    dot operands' dtype by ``is_cuda``; Triton reads only its dtype and address."""

    @property
    def is_cuda(self) -> bool:
        return True


def gpu_like(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(GpuLike)


@dataclasses.dataclass
class Launch:
    """One kernel launch as a GPU run would compile it."""

    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple
    case: str

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    def key(self) -> str:
        constexprs = {k: str(v) for k, v in self.constexprs.items()}
        return repr((self.kernel, self.signature, sorted(constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))


@contextlib.contextmanager
def recording_launches(case: Callable[[], str]) -> Iterator[list[Launch]]:
    """Within the block, every JITFunction launch is recorded (never run); ``case()`` names
    the scenario a launch belongs to."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from ttsearch.kernels import split_kv

    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches: list[Launch] = []
    binders: dict[int, Callable] = {}

    def record(self, *args, grid, warmup, **kwargs):
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[id(self)](*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, options, bound, specialization, options)
        launches.append(Launch(self, signature, constexprs, attrs, options, tuple(grid), case()))

    saved_run, saved_sms = JITFunction.run, split_kv.sm_count
    JITFunction.run, split_kv.sm_count = record, lambda device: H100_SMS
    try:
        yield launches
    finally:
        JITFunction.run, split_kv.sm_count = saved_run, saved_sms


# ----------------------------------------------------------------------------- launch scenarios


def _paged(num_seqs: int, context: int, m: ModelShape, dtype, block_size: int = 16):
    """Caches and tables for ``num_seqs`` contexts of ``context`` tokens. Nothing runs, so the
    pools hold one block: only the shapes the launchers read matter."""
    k_cache = torch.empty(1, block_size, m.kv_heads, m.head_dim, dtype=dtype)
    tables = torch.zeros(num_seqs, -(-context // block_size), dtype=torch.int32)
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    return [gpu_like(t) for t in (k_cache, torch.empty_like(k_cache), tables, lens)]


def _scenarios(m: ModelShape, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """The launches one forward and one decode step of ``m`` make, at the batch shapes that
    choose different specializations (tile sizes, split or not)."""
    from ttsearch.kernels import (activation, cascade_decode_attention, copy_blocks, decode_attention,
                                  extend_attention, prm_step_score, quantized_linear, rms_norm, rotary, sampling,
                                  store_kv)
    from ttsearch.block_formats import row_bytes

    g = gpu_like
    scale = m.head_dim**-0.5

    def q(tokens):
        return g(torch.empty(tokens, m.heads, m.head_dim, dtype=dtype))

    def prefill():  # 4 prompts of 512 tokens
        tokens = 2048
        x = g(torch.empty(tokens, m.hidden, dtype=dtype))
        rms_norm.rms_norm(g(torch.empty_like(x)), x, g(torch.ones(m.hidden, dtype=dtype)), 1e-5)
        rms_norm.fused_add_rms_norm(x, g(torch.empty_like(x)), g(torch.ones(m.hidden, dtype=dtype)), 1e-5)
        key = g(torch.empty(tokens, m.kv_heads, m.head_dim, dtype=dtype))
        cos_sin = g(torch.zeros(4096, m.head_dim, dtype=dtype))
        rotary.rotary_embedding(g(torch.arange(tokens)), q(tokens), key, cos_sin)
        gate_up = g(torch.empty(tokens, 2 * m.intermediate, dtype=dtype))
        activation.silu_and_mul(g(torch.empty(tokens, m.intermediate, dtype=dtype)), gate_up)
        k_cache, v_cache, tables, lens = _paged(4, 512, m, dtype)
        store_kv.store_kv(key, key, k_cache, v_cache, g(torch.arange(tokens)))
        starts = g(torch.arange(0, tokens + 1, 512, dtype=torch.int32))
        extend_attention.paged_extend_attention(q(tokens), k_cache, v_cache, tables, starts, lens, scale)

    def extend_short():  # 64 sequences append 4 tokens each (step requests, verifier steps)
        k_cache, v_cache, tables, lens = _paged(64, 600, m, dtype)
        starts = g(torch.arange(0, 257, 4, dtype=torch.int32))
        extend_attention.paged_extend_attention(q(256), k_cache, v_cache, tables, starts, lens, scale)

    def decode():  # 256 beams of 1024 tokens, no sharing: one split
        k_cache, v_cache, tables, lens = _paged(256, 1024, m, dtype)
        decode_attention.paged_decode_attention(q(256), k_cache, v_cache, tables, lens, scale)

    def decode_split():  # one long sequence: split-KV and the merge
        k_cache, v_cache, tables, lens = _paged(1, 8192, m, dtype)
        decode_attention.paged_decode_attention(q(1), k_cache, v_cache, tables, lens, scale)

    def cascade(beams, prefix, own, splits):
        k_cache, v_cache, tables, lens = _paged(beams, prefix + own, m, dtype)
        prefix_blocks = prefix // 16
        prefix_tables = tables[:1, :prefix_blocks].clone()
        prefix_lens = g(torch.tensor([prefix], dtype=torch.int32))
        seq_group = g(torch.zeros(beams, 1, dtype=torch.int32))
        cascade_decode_attention.cascade_decode_attention_split(
            q(beams), k_cache, v_cache, tables, lens, prefix_tables, prefix_lens, seq_group, scale,
            num_splits=splits, node_splits=splits)

    def decode_tail():  # the sampler, a copy-on-write of tails, the verifier's readout
        rows = 8
        sampling.sample_tokens(g(torch.empty(rows, m.vocab, dtype=dtype)), g(torch.ones(rows)),
                               g(torch.zeros(rows, dtype=torch.int64)), g(torch.ones(rows)), g(torch.zeros(rows)))
        kv_cache = g(torch.zeros(2, 2, 8, 16, m.kv_heads, m.head_dim, dtype=dtype))
        copy_blocks.copy_blocks(kv_cache, g(torch.tensor([0, 1])), g(torch.tensor([2, 3])))
        hidden = g(torch.zeros(64, m.hidden, dtype=dtype))
        prm_step_score.prm_step_score(hidden, g(torch.ones(m.hidden, dtype=dtype)), 1e-5,
                                      g(torch.zeros(2, m.hidden, dtype=dtype)), None, 1, g(torch.zeros(64)),
                                      g(torch.zeros(64, dtype=torch.int32)), "min")

    def packed_weights():  # GGUF blocks: the formats a model of this width ships in, a decode step's rows
        formats = ("q4_1", "q8_0") if m.hidden % 256 else ("q4_K", "q6_K")
        for qtype in formats:
            blocks = g(torch.empty(m.intermediate, row_bytes(qtype, m.hidden), dtype=torch.uint8))
            quantized_linear.quantized_linear(g(torch.empty(64, m.hidden, dtype=dtype)), blocks, qtype)

    return {
        "prefill 4x512": prefill,
        "extend 64x4": extend_short,
        "decode 256x1024": decode,
        "decode 1x8192 split": decode_split,
        # 64 beams behind one 512-token node (the grid of 24 programs), 64 own tokens each
        "cascade 64 beams, 512 shared": lambda: cascade(64, 512, 64, None),
        "cascade 4 beams, 4096 shared, split": lambda: cascade(4, 4096, 64, 4),
        "sampling, copies, PRM readout": decode_tail,
        "packed weights x64": packed_weights,
    }


def capture(models=MODELS, dtypes=DTYPES) -> list[Launch]:
    """Every distinct launch of every scenario, for every model and dtype."""
    current = [""]
    with recording_launches(lambda: current[0]) as launches:
        for m in models:
            for dtype in dtypes:
                for name, run in _scenarios(m, dtype).items():
                    current[0] = f"{m.name} {str(dtype)[6:]} {name}"
                    run()
    unique: dict[str, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Compiled:
    kernel: str
    case: str
    target: int
    dtype: str  # the data's dtype, from the first floating pointer argument
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # the stack frame and local memory per thread: ptxas's spills
    shared_bytes: int  # dynamic (Triton's buffers) plus static
    kv_buffers: int  # slots of the largest pipelined load buffer: 2+ overlaps a tile's loads with the last one's math
    grid: tuple
    constexprs: dict

    def blocks_per_sm(self) -> int:
        return blocks_per_sm(self.target, self.registers, self.num_warps, self.shared_bytes)


def blocks_per_sm(target: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM, from the three limits (registers are allocated per warp in
    units of 256, shared memory per block with the runtime's reserve)."""
    lim = LIMITS[target]
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (lim.registers // per_warp) // num_warps if per_warp else lim.max_blocks
    by_warps = lim.max_warps // num_warps
    by_shared = lim.shared_bytes // (shared_bytes + lim.reserved_shared_per_block)
    return min(by_registers, by_warps, by_shared, lim.max_blocks)


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# a multi-buffered shared-memory allocation of the software pipeliner: [slots, rows, cols]
_PIPELINE_BUFFER = re.compile(r"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes per thread, static shared bytes) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    usage = _USAGE.search(out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    regs, stack, shared, local = map(int, usage.groups())
    return regs, stack + local, shared


def _data_dtype(launch: Launch) -> str:
    for ty in launch.signature.values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] in ("bf16", "fp16", "fp32"):
            return ty[1:]
    return "-"


def compile_launch(launch: Launch, target: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    gpu = GPUTarget("cuda", target, 32)
    kernel = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs), target=gpu,
                            options=launch.options)
    regs, spills, static_shared = resource_usage(kernel.asm["cubin"])
    constexprs = {launch.fn.arg_names[path[0]]: v for path, v in launch.constexprs.items() if len(path) == 1}
    return Compiled(
        kernel=launch.kernel, case=launch.case, target=target, dtype=_data_dtype(launch),
        num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages, registers=regs,
        spill_bytes=spills, shared_bytes=kernel.metadata.shared + static_shared,
        kv_buffers=max(map(int, _PIPELINE_BUFFER.findall(kernel.asm["ttgir"])), default=0), grid=launch.grid,
        constexprs={k: v if isinstance(v, (int, bool, float)) else str(v) for k, v in constexprs.items()},
    )


_JOBS: list[tuple[Launch, int]] = []  # what forked workers compile, by index


def _compile_job(index: int) -> Compiled:
    return compile_launch(*_JOBS[index])


def compile_all(launches: list[Launch], targets=TARGETS, workers: int = 1) -> list[Compiled]:
    """Every launch for every target, in ``workers`` forked processes (Triton's compiler holds
    the GIL, so threads would not help; forked workers inherit the recorded launches)."""
    _JOBS[:] = [(launch, target) for target in targets for launch in launches]
    if workers <= 1:
        return [_compile_job(i) for i in range(len(_JOBS))]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile_job, range(len(_JOBS)), chunksize=1)


# ----------------------------------------------------------------------------- report


def summary(results: list[Compiled], target: int) -> list[dict]:
    """Per kernel on ``target``: how many configurations, and the worst of each resource."""
    rows = {}
    for r in results:
        if r.target != target:
            continue
        row = rows.setdefault(r.kernel, {"kernel": r.kernel, "configs": 0, "registers": 0, "spill_bytes": 0,
                                         "shared_bytes": 0, "min_blocks_per_sm": LIMITS[target].max_blocks,
                                         "min_kv_buffers": r.kv_buffers})
        row["configs"] += 1
        row["registers"] = max(row["registers"], r.registers)
        row["spill_bytes"] = max(row["spill_bytes"], r.spill_bytes)
        row["shared_bytes"] = max(row["shared_bytes"], r.shared_bytes)
        row["min_blocks_per_sm"] = min(row["min_blocks_per_sm"], r.blocks_per_sm())
        row["min_kv_buffers"] = min(row["min_kv_buffers"], r.kv_buffers)
    return list(rows.values())


def markdown(rows: list[dict], target: int) -> str:
    lines = [f"| kernel (sm_{target}) | configs | registers (max) | spill bytes (max) | shared KiB (max) | "
             f"blocks/SM (min) | load buffers (min) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['kernel']}` | {row['configs']} | {row['registers']} | {row['spill_bytes']} | "
                     f"{row['shared_bytes'] / 1024:.1f} | {row['min_blocks_per_sm']} | "
                     f"{row['min_kv_buffers'] or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--json", help="write every configuration's resources here")
    parser.add_argument("--all", action="store_true", help="print every configuration, not only the summary")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    results = compile_all(capture(), targets, args.jobs)
    if args.all:
        for r in results:
            print(f"sm_{r.target} {r.kernel:24} {r.dtype:4} regs {r.registers:3} spills {r.spill_bytes:5} "
                  f"shared {r.shared_bytes:6} blocks/SM {r.blocks_per_sm():2} buffers {r.kv_buffers} "
                  f"grid {r.grid}  [{r.case}] {r.constexprs}")
    for target in targets:
        print(markdown(summary(results, target), target), end="\n\n")
    if args.json:
        import triton

        record = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "command": "python -m ttsearch.kernels.compile_check --json " + args.json,
            "summary": {f"sm_{t}": summary(results, t) for t in targets},
            "configurations": [dict(dataclasses.asdict(r), blocks_per_sm=r.blocks_per_sm()) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
