"""The Triton kernels as the CUDA implementations of the ``ttsearch`` ops.

kernels/ has no ``__init__.py`` on purpose: run from the repository root, a regular package
there would be found first as a top-level ``kernels`` and shadow Hugging Face's ``kernels``
package (which transformers imports). It installs as ``ttsearch.kernels`` through the
``ttsearch/kernels`` link, an implicit namespace subpackage, and is imported only by that name.
"""

from __future__ import annotations

import torch


def register_cuda(lib: torch.library.Library) -> None:
    """Register the Triton launchers as the CUDA implementations of the ``ttsearch`` ops."""
    from ttsearch.kernels.cascade_decode_attention import cascade_decode_attention
    from ttsearch.kernels.copy_blocks import copy_blocks
    from ttsearch.kernels.decode_attention import paged_decode_attention
    from ttsearch.kernels.extend_attention import paged_extend_attention
    from ttsearch.kernels.prm_step_score import prm_step_score
    from ttsearch.kernels.store_kv import store_kv
    from ttsearch.kernels.activation import silu_and_mul
    from ttsearch.kernels.rms_norm import fused_add_rms_norm, rms_norm
    from ttsearch.kernels.rotary import rotary_embedding
    from ttsearch.kernels.quantized_linear import quantized_linear
    from ttsearch.kernels.sampling import sample_tokens

    for fn in (store_kv, paged_decode_attention, cascade_decode_attention, paged_extend_attention, copy_blocks,
               prm_step_score, rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul, sample_tokens,
               quantized_linear):
        lib.impl(fn.__name__, fn, "CUDA")
