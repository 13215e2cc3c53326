"""The op registry: every ttsearch op's schema, defined once, and the implementations behind it.

Each op has a torch.library schema under the ``ttsearch`` namespace and a pure-torch
reference body (``ttsearch.ops.reference``) registered as the device-generic kernel, plus a
fake kernel for tracing. Fast implementations register the same op name for one dispatch
key each: the C++ extension ``ttsearch._C_<isa>`` for CPU (``ttsearch.ops.cpu_isa`` picks the
level), the Triton kernels in ``ttsearch.kernels`` for CUDA. The dispatcher then picks the
implementation from the tensors' device, so call sites never branch on the device.

``TTSEARCH_OPS`` chooses what is loaded:
  ``auto`` (default)  fast implementations where they load; one warning if the C++
                      extension is missing, then the reference serves the CPU.
  ``reference``       the reference bodies everywhere (debugging, and the tests' oracle).
  ``fast``            fast implementations required: failing to load one raises.

Call the ops through ``ttsearch.ops``, whose wrappers validate their arguments first.
"""

from __future__ import annotations

import os
import warnings

import torch

from ttsearch.ops import reference

#: op name -> its torch.library schema
SCHEMAS = {
    "store_kv": "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    "paged_decode_attention": "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
    "cascade_decode_attention": "cascade_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, Tensor prefix_tables, Tensor prefix_lens, Tensor seq_group, float scale) -> Tensor",
    "paged_extend_attention": "paged_extend_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor",
    "copy_blocks": "copy_blocks(Tensor(a!) kv_cache, Tensor src, Tensor dst) -> ()",
    "prm_step_score": "prm_step_score(Tensor hidden, Tensor? norm_weight, float eps, Tensor head_weight, Tensor? head_bias, int positive_index, Tensor prev_agg, Tensor prev_count, str aggregation) -> (Tensor, Tensor)",
    "rms_norm": "rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor(a!) out, Tensor input) -> ()",
    "sample_tokens": "sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor u) -> Tensor",
    "quantized_linear": "quantized_linear(Tensor x, Tensor blocks, str qtype) -> Tensor",
}

#: the op library: fast implementations register into it
LIB = torch.library.Library("ttsearch", "DEF")
for _name, _schema in SCHEMAS.items():
    LIB.define(_schema)
    LIB.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


@torch.library.register_fake("ttsearch::paged_decode_attention")
def _(query, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::cascade_decode_attention")
def _(query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::paged_extend_attention")
def _(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::store_kv")
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("ttsearch::copy_blocks")
def _(kv_cache, src, dst):
    return None


@torch.library.register_fake("ttsearch::prm_step_score")
def _(hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.register_fake("ttsearch::rms_norm")
def _(out, input, weight, eps):
    return None


@torch.library.register_fake("ttsearch::fused_add_rms_norm")
def _(input, residual, weight, eps):
    return None


@torch.library.register_fake("ttsearch::rotary_embedding")
def _(positions, query, key, cos_sin_cache):
    return None


@torch.library.register_fake("ttsearch::silu_and_mul")
def _(out, input):
    return None


@torch.library.register_fake("ttsearch::sample_tokens")
def _(logits, temperature, top_k, top_p, u):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@torch.library.register_fake("ttsearch::quantized_linear")
def _(x, blocks, qtype):
    return x.new_empty(x.shape[0], blocks.shape[0])


MODE = os.environ.get("TTSEARCH_OPS", "auto")
if MODE not in ("auto", "reference", "fast"):
    raise ValueError(f"TTSEARCH_OPS={MODE!r}: expected one of 'auto', 'reference', 'fast'")

#: which implementation serves each device, for reports and benchmarks
IMPLEMENTATIONS: dict[str, str] = {"cpu": "reference", "cuda": "reference"}


def load_fast_implementations() -> None:
    """Register the fast implementations ``MODE`` asks for (once, when ``ttsearch.ops`` is imported)."""
    if MODE == "reference":
        return
    try:
        from ttsearch.ops import cpu_isa

        # imports the one ttsearch._C_<level> for this CPU (or TTSEARCH_CPU_ISA), which
        # registers its CPU kernels; a forced level it cannot load raises ValueError, never falls back
        IMPLEMENTATIONS["cpu"] = f"cpp-{cpu_isa.load()}"
    except ImportError as exc:
        if MODE == "fast":
            raise ImportError(f"TTSEARCH_OPS=fast but the C++ extension ttsearch._C_<isa> did not load: {exc}") from exc
        warnings.warn(
            f"the C++ extension ttsearch._C_<isa> is not built ({exc}); CPU ops run on the pure-torch reference. "
            "Reinstall with a C++ compiler to build it.",
            stacklevel=3,
        )
    if torch.cuda.is_available():
        try:
            from ttsearch.kernels.registration import register_cuda  # registers the Triton kernels

            register_cuda(LIB)
            IMPLEMENTATIONS["cuda"] = "triton"
        except ImportError as exc:
            if MODE == "fast":
                raise ImportError(f"TTSEARCH_OPS=fast but the Triton kernels did not load: {exc}") from exc
            warnings.warn(f"Triton kernels unavailable ({exc}); CUDA ops run on the reference.", stacklevel=3)
