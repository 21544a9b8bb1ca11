"""Build side only: how a converter that starts from PyTorch traces a model. Imports torch when called.

In eval mode under ``no_grad``, ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` take torch's
"fast path": ``torch.jit.trace`` records one fused operator (``aten::_transformer_encoder_layer_fwd``) that no
converter knows. `no_fused_attention` turns that path off while the Core ML target traces, so the trace holds
torch's own operators (numerically the same). The students ``toolchain compress`` writes hold no torch
attention at all (`toolchain.attention` replaces it with plain q/k/v layers), which every converter takes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def no_fused_attention() -> Iterator[None]:
    """Inside: torch's multi-head-attention fast path off (restored on exit)."""
    import torch

    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


__all__ = ["no_fused_attention"]
