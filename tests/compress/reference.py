"""Independent references for the method tests: the same tiny model, run without kvlab.

kvlab's engine replaces the model's attention; these helpers run an identical copy of the
model (same architecture and seed, so the same weights) either through transformers' own
eager attention (:func:`eager_run`: attention probabilities, queries, keys, values of every
layer) or through a forward written out here with the attention a test supplies
(:func:`reference_logits`), so a test can state what a method must keep or compute from the
paper's definition and compare it with what kvlab's cache holds (public API only:
``cache.layers[i].key_positions()``, ``.keys``, ``.values``, ``.heads``).

Everything here is for llama-architecture tiny models (``tests.conftest.tiny_model``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.conftest import tiny_model


@dataclass
class EagerRun:
    """One prompt through the eager model: per layer ``probs[l]`` ``[Hq, n, n]`` (causal
    softmax), ``queries[l]`` ``[Hq, n, d]`` (unrotated), ``rotated_queries[l]``,
    ``keys[l]`` ``[Hkv, n, d]`` (rotated, as kvlab stores them), ``values[l]``."""

    probs: list[Tensor]
    queries: list[Tensor]
    rotated_queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA): query head ``h`` reads KV head ``h // group``."""
        return self.queries[0].shape[0] // self.keys[0].shape[0]

    def grouped(self, per_query_head: Tensor, reduce: str = "mean") -> Tensor:
        """``[Hq, ...]`` -> ``[Hkv, ...]``: reduce the query heads of each KV head, written out
        with a loop over KV heads (heads ``kv * group .. kv * group + group - 1``)."""
        g = self.group
        rows = []
        for kv in range(per_query_head.shape[0] // g):
            members = per_query_head[kv * g : (kv + 1) * g]
            rows.append({"mean": members.mean(0), "sum": members.sum(0), "max": members.amax(0)}[reduce])
        return torch.stack(rows)


@torch.no_grad()
def eager_run(ids: list[int], seed: int = 0, **overrides) -> EagerRun:
    model = tiny_model("llama", seed, **overrides)
    model.set_attn_implementation("eager")
    input_ids = torch.tensor([ids])
    out = model(input_ids, output_attentions=True, output_hidden_states=True)
    cos, sin = model.model.rotary_emb(out.hidden_states[0], torch.arange(len(ids))[None])
    run = EagerRun([], [], [], [], [])
    for index, layer in enumerate(model.model.layers):
        q, k, v = project(layer, out.hidden_states[index])
        qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
        run.probs.append(out.attentions[index][0])
        run.queries.append(q[0])
        run.rotated_queries.append(qr[0])
        run.keys.append(kr[0])
        run.values.append(v[0])
    return run


def project(layer, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unrotated q ``[1, Hq, n, d]``, k, v ``[1, Hkv, n, d]`` of a llama decoder layer."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    n, d = hidden.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, d).transpose(1, 2)
    return q, k, v


Attention = Callable[[int, Tensor, Tensor, Tensor, "Rope"], Tensor]
"""``attention(layer, q [Hq, n, d], k [Hkv, n, d], v [Hkv, n, d], rope) -> [Hq, n, d]``:
q and k unrotated; ``rope(x, positions)`` rotates ``x`` ``[heads, m, d]`` to ``positions``."""


class Rope:
    """The model's own RoPE at any positions (transformers' rotary embedding)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.model.model.rotary_emb(x[None], positions[None].long())
        out, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
        return out[0]


def causal_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None
) -> Tensor:
    """Softmax attention of rotated ``q`` ``[Hq, t, d]`` over rotated ``k``/``v``
    ``[Hkv, n, d]`` (query row ``i`` is position ``n - t + i``), restricted by ``allowed``
    ``[t, n]`` or ``[Hq, t, n]``."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    t, n = q.shape[1], k.shape[1]
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.arange(n)[None, :] <= torch.arange(n - t, n)[:, None]
    mask = causal if allowed is None else causal & allowed
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v


def dense(layer: int, q: Tensor, k: Tensor, v: Tensor, rope: Rope) -> Tensor:
    n = q.shape[1]
    return causal_softmax_attention(rope(q, torch.arange(n)), rope(k, torch.arange(n)), v)


@torch.no_grad()
def reference_logits(ids: list[int], attention: Attention = dense, seed: int = 0, **overrides) -> Tensor:
    """Logits ``[n, vocab]`` of ``ids`` through the tiny llama model written out layer by
    layer, every attention computed by ``attention``."""
    model = tiny_model("llama", seed, **overrides)
    rope = Rope(model)
    h = model.model.embed_tokens(torch.tensor([ids]))
    for index, layer in enumerate(model.model.layers):
        q, k, v = project(layer, h)
        out = attention(index, q[0], k[0], v[0], rope)  # [Hq, n, d]
        h = h + layer.self_attn.o_proj(out.transpose(0, 1).reshape(1, len(ids), -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))[0]


def head_positions(layer) -> list[list[int]]:
    """The positions each KV head of a cache layer holds (batch row 0), in storage order."""
    heads = getattr(layer, "heads", None)
    if heads is not None:  # a ragged layer: one storage per KV head
        return [head.key_positions().reshape(-1).tolist() for head in heads]
    positions = layer.key_positions()
    if positions.dim() == 1:
        return [positions.tolist()] * layer.kv_heads
    return [row.tolist() for row in positions[0]]


def assert_top_k(kept: list[int], scores: Tensor, k: int, tol: float = 1e-5) -> None:
    """``kept`` (sorted indices into ``scores`` ``[m]``) is a top ``k`` of ``scores``: ``k``
    distinct indices, none scored lower than a left-out one by more than ``tol`` (fp noise
    may swap near ties, nothing else)."""
    assert kept == sorted(set(kept)) and len(kept) == k, (len(kept), k)
    assert all(0 <= i < scores.numel() for i in kept)
    dropped = torch.ones(scores.numel(), dtype=torch.bool)
    dropped[kept] = False
    if k and bool(dropped.any()):
        low, high = float(scores[kept].min()), float(scores[dropped].max())
        assert low >= high - tol, f"kept score {low} < dropped score {high}"


def evicting_decode_attention(prompt: int, initial, evict) -> Attention:
    """The reference attention of a method that evicts at the end of the prefill and after
    every decoding step. Rows before ``prompt`` are the dense prefill. Then, per layer,
    ``initial(layer, probs)`` (``probs`` ``[Hq, prompt, prompt]``: the prefill's causal
    attention) gives the kept positions of each KV head; each later row ``i`` (a decoding
    step) attends, per query head, to its KV head's kept positions plus ``i``, and
    ``evict(layer, held, probs, i)`` (``held``: per KV head the positions attended, sorted;
    ``probs``: per query head the attention over them) returns what each KV head keeps."""

    def attention(layer, q, k, v, rope):
        n = q.shape[1]
        qr, kr = rope(q, torch.arange(n)), rope(k, torch.arange(n))
        out = causal_softmax_attention(qr, kr, v)
        group, scale = q.shape[0] // k.shape[0], q.shape[-1] ** -0.5
        keys = kr[:, :prompt].repeat_interleave(group, 0)
        causal = torch.arange(prompt)[None, :] <= torch.arange(prompt)[:, None]
        logits = (qr[:, :prompt] @ keys.transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))
        kept = initial(layer, torch.softmax(logits, dim=-1))
        for i in range(prompt, n):
            held = [sorted(positions + [i]) for positions in kept]
            probs = []
            for h in range(q.shape[0]):
                index = torch.tensor(held[h // group])
                p = torch.softmax(qr[h, i] @ kr[h // group, index].T * scale, dim=-1)
                out[h, i] = p @ v[h // group, index]
                probs.append(p)
            kept = evict(layer, held, probs, i)
        return out

    return attention


def top_indices(scores: Tensor, k: int, gap: float = 1e-5) -> list[int]:
    """The ``k`` largest of ``scores`` ``[m]`` (sorted indices), asserting no near tie at the
    cut, so a test that follows one choice through later steps is unambiguous."""
    values = scores.sort(descending=True).values
    if 0 < k < scores.numel():
        assert values[k - 1] - values[k] > gap, "near tie at the cut: pick another prompt"
    return sorted(scores.topk(k).indices.tolist())


def lowest(scores: Tensor, gap: float = 1e-6) -> int:
    """The index of the smallest of ``scores``, asserting no near tie with the next one."""
    values = scores.sort().values
    if scores.numel() > 1:
        assert values[1] - values[0] > gap, "near tie for the lowest: pick another prompt"
    return int(scores.argmin())
