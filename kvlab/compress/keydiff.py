"""KeyDiff: keep the keys least similar to the average key direction.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", arXiv:2504.15364. Geometrically distinctive keys draw
high attention. Per KV head, the anchor is the mean of the normalised keys,
``mu = mean_i k_i / ||k_i||``, and entry ``i`` scores ``-cos(k_i, mu)``; each head keeps its
``budget`` highest scores. No attention is computed; the query plays no part.

The paper evicts block by block while a long prompt streams through a fixed cache; kvlab
compresses once at the end of the prefill, which equals a single block holding the whole
prompt. The anchor uses every entry of the layer (window included). ``window=0`` by default:
neither the paper's main algorithm nor kvpress's ``KeyDiffPress`` protects recent tokens.
Keys are scored as attention sees them (post-RoPE; rotated first when the position method
stores them pre-RoPE), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kvlab.compress.base import ScoredCompression, attention_keys
from kvlab.engine.context import LayerContext
from kvlab.registry import Budget, param, register


@register
@dataclass(frozen=True)
class KeyDiff(ScoredCompression):
    name: ClassVar[str] = "keydiff"
    paper: ClassVar[str] = "Park et al., KeyDiff, arXiv:2504.15364"
    summary: ClassVar[str] = "Keep the keys least similar to their head's mean key direction."

    budget: Budget = param(2048, "entries kept per layer and KV head (window included)")
    window: int = param(0, "most recent entries always kept (paper: none)", min=0, max=512)

    def score(self, q_window: Tensor, ctx: LayerContext, window: int) -> Tensor:
        keys = attention_keys(ctx).float()  # [b, kv_heads, n, d]
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)  # [b, kv_heads, 1, d]
        prefix = keys[:, :, : keys.shape[2] - window]
        return -F.cosine_similarity(prefix, anchor, dim=-1)
