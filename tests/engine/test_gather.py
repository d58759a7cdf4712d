"""Shared decode-step mechanics: gathers of entry runs, reused buffers, the RoPE table."""

from __future__ import annotations

import pytest
import torch

from kvlab.engine.kernels import gather_entries
from kvlab.engine.rotary import Rotary
from kvlab.engine.workspace import Workspace


def _reference(x: torch.Tensor, starts: torch.Tensor, run: int) -> torch.Tensor:
    b, h = x.shape[:2]
    hs = starts.shape[1]
    rows = [
        torch.cat([x[i, s // (hs // h), p : p + run] for p in starts[i, s].tolist()])
        for i in range(b) for s in range(hs)
    ]
    return torch.stack(rows).view(b, hs, -1, x.shape[-1])


@pytest.mark.parametrize("run", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_gather_entries_reads_each_heads_runs(run: int, group: int) -> None:
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(2, 2, 70, 8, generator=g)
    x = storage[:, :, :64]  # a view with a reserve beyond its entries, as a layer's keys
    starts = torch.randint(0, 64 - run + 1, (2, 2 * group, 5), generator=g)
    starts[0, 0, 0] = 64 - run  # a run that ends on the last entry
    assert torch.equal(gather_entries(x, starts, run), _reference(x, starts, run))
    out = torch.empty(2, 2 * group, 5 * run, 8)
    assert gather_entries(x, starts, run, out=out) is out
    assert torch.equal(out, _reference(x, starts, run))
    # a non-contiguous layout is read correctly too
    t = storage.transpose(0, 1)[:, :, :64]
    assert torch.equal(gather_entries(t, starts, run), _reference(t, starts, run))


@pytest.mark.parametrize("heads", [[1], [0, 2], [2, 0]])
def test_gather_entries_reads_only_the_given_heads(heads: list[int]) -> None:
    """``heads=``: the runs of a subset of the KV heads (Lychee's sparse heads), the same as
    gathering from those heads copied out, the last head included."""
    g = torch.Generator().manual_seed(1)
    storage = torch.randn(2, 3, 40, 8, generator=g)
    x = storage[:, :, :36]
    starts = torch.randint(0, 36 - 4 + 1, (2, len(heads), 6), generator=g)
    starts[-1, -1, -1] = 32  # the last run of the last row ends on the last entry
    subset = x[:, heads].contiguous()
    got = gather_entries(x, starts, 4, heads=torch.tensor(heads))
    assert torch.equal(got, _reference(subset, starts, 4))


def test_workspace_reuses_memory_and_grows() -> None:
    ws = Workspace()
    a = ws.buffer("keys", (2, 3), torch.float32, torch.device("cpu"))
    b = ws.buffer("keys", (3, 2), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()
    assert ws.buffer("values", (2, 3), torch.float32, torch.device("cpu")).data_ptr() != a.data_ptr()
    big = ws.buffer("keys", (10, 10), torch.float32, torch.device("cpu"))
    assert big.shape == (10, 10) and ws.nbytes() == 4 * (100 + 6)


def _direct(rotary: Rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * rotary.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * rotary.attention_factor, emb.sin() * rotary.attention_factor


def test_rope_table_gives_the_direct_values() -> None:
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), attention_factor=1.3)
    for positions in (torch.arange(-3000, 5000, 7), torch.arange(-5, 5)):  # table / direct
        cos, sin = rotary.cos_sin(positions, torch.float32)
        want_cos, want_sin = _direct(rotary, positions)
        torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, want_sin, rtol=0, atol=1e-6)
    grown = torch.arange(0, 20000, 3)  # beyond the table: it grows
    torch.testing.assert_close(rotary.cos_sin(grown, torch.float32)[1], _direct(rotary, grown)[1],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask", ["none", "bool_q", "bool_kv", "float", "empty_row"])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_attention_equals_sdpa(mask: str, group: int) -> None:
    """The one-query matmul kernel gives SDPA's output, GQA, masks of every layout included."""
    import torch.nn.functional as F

    from kvlab.engine.kernels import decode_attention, dense_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2 * group, 1, 16, generator=g)
    storage = torch.randn(2, 2, 40, 16, generator=g)
    k, v = storage[:, :, :33], torch.randn(2, 2, 33, 16, generator=g)
    allowed = None
    if mask == "bool_q" or mask == "empty_row":
        allowed = torch.rand(2, 2 * group, 1, 33, generator=g) > 0.4
        if mask == "empty_row":
            allowed[1, 0] = False
    elif mask == "bool_kv":
        allowed = torch.rand(2, 2, 1, 33, generator=g) > 0.4
    elif mask == "float":
        allowed = torch.where(torch.rand(2, 1, 1, 33, generator=g) > 0.4, 0.0, float("-inf"))
    sdpa_mask = None if allowed is None else (
        allowed.repeat_interleave(group, dim=1) if allowed.shape[1] == 2 and group > 1 else allowed)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=sdpa_mask, scale=0.3)
    torch.testing.assert_close(decode_attention(q, k, v, 0.3, allowed), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense_attention(q, k, v, 0.3, allowed), want, rtol=1e-5, atol=1e-6)


def test_entry_positions_follow_the_layers_positions() -> None:
    """Gathered entries' token positions: the entries while contiguous, else the stored
    positions (shared ``[n]`` or per KV head ``[b, h, n]``, a slice of heads included)."""
    from kvlab.engine.cache import LayerKV

    layer = LayerKV()
    layer.append(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4), torch.arange(6))
    entries = torch.tensor([[[0, 5], [1, 2]]])
    assert torch.equal(layer.entry_positions(entries), entries)
    layer.positions = torch.tensor([3, 7, 8, 10, 11, 20])
    assert layer.entry_positions(entries).tolist() == [[[3, 20], [7, 8]]]
    layer.positions = torch.tensor([[[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]]])
    assert layer.entry_positions(entries).tolist() == [[[0, 5], [11, 12]]]
    assert layer.entry_positions(entries[:, 1:], slice(1, 2)).tolist() == [[[11, 12]]]
