"""megatron_lcr.parallel.context: zigzag CP split/merge on hand-checked indices, references, and gloo."""

import bisect

import pytest
import torch

from megatron_lcr.data.packing import cu_seqlens, packed_position_ids
from megatron_lcr.parallel.context import (
    local_cu_seqlens,
    pad_for_cp,
    zigzag_indices,
    zigzag_indices_packed,
    zigzag_merge,
    zigzag_merge_packed,
    zigzag_split,
    zigzag_split_packed,
)
from tests.distributed import WORKERS, run_torchrun

# --- indices, by hand ---


@pytest.mark.parametrize(
    "seq_len, cp, expected",
    [
        (8, 2, [[0, 1, 6, 7], [2, 3, 4, 5]]),
        (8, 4, [[0, 7], [1, 6], [2, 5], [3, 4]]),
        (12, 2, [[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]]),
        (16, 4, [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]),
        (5, 1, [[0, 1, 2, 3, 4]]),  # cp = 1: identity, no divisibility needed
    ],
)
def test_zigzag_indices_by_hand(seq_len, cp, expected):
    assert [zigzag_indices(seq_len, cp, rank).tolist() for rank in range(cp)] == expected


def test_zigzag_split_by_hand():
    x = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26, 27]])
    assert zigzag_split(x, 2, 0).tolist() == [[10, 11, 16, 17], [20, 21, 26, 27]]
    assert zigzag_split(x, 2, 1).tolist() == [[12, 13, 14, 15], [22, 23, 24, 25]]
    assert zigzag_split(x, 1, 0) is x


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_zigzag_indices_partition_and_balance_causal_work(cp):
    seq_len = 32
    per_rank = [zigzag_indices(seq_len, cp, rank) for rank in range(cp)]
    assert sorted(torch.cat(per_rank).tolist()) == list(range(seq_len))
    # Causal attention: the token at position p attends to p + 1 keys. Zigzag gives each rank the same
    # total: chunk r and chunk 2cp-1-r sum to a constant.
    work = {int((idx + 1).sum()) for idx in per_rank}
    assert len(work) == 1


def megatron_style_split(x: torch.Tensor, cp: int, rank: int, dim: int) -> torch.Tensor:
    """Reference: Megatron-Core's view into [.., 2cp, S/2cp, ..] + index_select of chunks (r, 2cp-1-r)."""
    shape = x.shape
    view = x.reshape(*shape[:dim], 2 * cp, shape[dim] // (2 * cp), *shape[dim + 1 :])
    picked = view.index_select(dim, torch.tensor([rank, 2 * cp - 1 - rank]))
    return picked.reshape(*shape[:dim], -1, *shape[dim + 1 :])


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("shape, dim", [((3, 16, 5), 1), ((16,), 0), ((2, 3, 16), 2), ((4, 16), -1)])
def test_split_matches_reference_and_merge_inverts_it(cp, shape, dim):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(cp))
    parts = [zigzag_split(x, cp, rank, dim=dim) for rank in range(cp)]
    seq_dim = dim % x.dim()
    for rank, part in enumerate(parts):
        assert torch.equal(part, megatron_style_split(x, cp, rank, seq_dim))
        assert torch.equal(part, x.index_select(dim, zigzag_indices(x.size(dim), cp, rank)))
        assert part.size(dim) == x.size(dim) // cp
    assert torch.equal(zigzag_merge(parts, cp, dim=dim), x)


def test_merge_is_differentiable():
    parts = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    full = zigzag_merge(parts, 2)
    (full * torch.arange(8.0)).sum().backward()
    # rank 0 holds positions [0, 1, 6, 7], rank 1 [2, 3, 4, 5]: d/dpart = its positions
    assert parts[0].grad.tolist() == [[0.0, 1.0, 6.0, 7.0]] * 2
    assert parts[1].grad.tolist() == [[2.0, 3.0, 4.0, 5.0]] * 2


# --- per-token log-probs and losses on shards equal the full-sequence computation ---


def token_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V], labels [B, S] -> log p(label) [B, S]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("cp", [2, 4])
def test_sharded_logprobs_and_loss_equal_the_full_sequence(cp):
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, vocab = 2, 16, 11
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    labels = tokens[:, 1:]  # shifted on the full sequence, before the CP split
    logits = torch.randn(batch, seq_len, vocab, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = (torch.rand(batch, seq_len, generator=gen) > 0.3).double()
    advantages = torch.randn(batch, 1, dtype=torch.float64, generator=gen).expand(batch, seq_len)

    full_logp = token_logp(logits, labels)
    num_tokens = mask.sum()  # the global normaliser, known to every rank
    full_loss = -(full_logp * advantages * mask).sum() / num_tokens
    (full_grad,) = torch.autograd.grad(full_loss, logits)

    local_logps, local_grads, total = [], [], 0.0
    for rank in range(cp):
        local_logits = zigzag_split(logits.detach(), cp, rank).requires_grad_()
        local_logp = token_logp(local_logits, zigzag_split(labels, cp, rank))
        loss = -(local_logp * zigzag_split(advantages, cp, rank) * zigzag_split(mask, cp, rank)).sum() / num_tokens
        local_grads.append(torch.autograd.grad(loss, local_logits)[0])
        local_logps.append(local_logp.detach())
        total += loss.item()  # the CP all-reduce (sum) of the local losses
    torch.testing.assert_close(zigzag_merge(local_logps, cp), full_logp.detach())
    torch.testing.assert_close(torch.tensor(total, dtype=torch.float64), full_loss.detach())
    torch.testing.assert_close(zigzag_merge(local_grads, cp), full_grad)


# --- packed rows (THD) ---


def test_pad_for_cp():
    assert pad_for_cp([3, 5, 8, 0], 2) == [4, 8, 8, 0]
    assert pad_for_cp([1, 6, 7], 3) == [6, 6, 12]
    assert pad_for_cp([3, 5], 1) == [3, 5]
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        pad_for_cp([-1], 2)


def test_packed_indices_by_hand():
    # sequence 0: tokens 0..3, chunk 1 -> rank 0 [0, 3], rank 1 [1, 2];
    # sequence 1: tokens 4..11, chunk 2 -> rank 0 [4, 5, 10, 11], rank 1 [6, 7, 8, 9]
    cu = [0, 4, 12]
    assert zigzag_indices_packed(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert zigzag_indices_packed(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    assert local_cu_seqlens(cu, 2).tolist() == [0, 2, 6]
    assert zigzag_indices_packed(torch.tensor([0, 3, 5], dtype=torch.int32), 1, 0).tolist() == [0, 1, 2, 3, 4]


def te_partitioned_indices(cu: list[int], cp: int, rank: int) -> list[int]:
    """Reference: TE's ``thd_get_partitioned_indices`` written per local token, as its kernel does.

    Local token t lies in sequence k (found in cu / cp); its index i within the sequence's local part
    maps to chunk ``rank`` for the first half and chunk ``2cp - 1 - rank`` for the second half.
    """
    local_cu = [c // cp for c in cu]
    out = []
    for token in range(local_cu[-1]):
        seq = bisect.bisect_right(local_cu, token) - 1
        half = (local_cu[seq + 1] - local_cu[seq]) // 2
        index = token - local_cu[seq]
        offset = rank if index < half else 2 * cp - 2 - rank
        out.append(index + local_cu[seq] * cp + half * offset)
    return out


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_packed_split_matches_te_and_per_sequence_splits_and_round_trips(cp):
    lengths = pad_for_cp([5, 1, 16, 9, 3], cp)
    cu = cu_seqlens(lengths)
    total = int(cu[-1])
    x = torch.randn(1, total, 3, generator=torch.Generator().manual_seed(cp))
    parts = []
    for rank in range(cp):
        assert zigzag_indices_packed(cu, cp, rank).tolist() == te_partitioned_indices(cu.tolist(), cp, rank)
        part = zigzag_split_packed(x, cu, cp, rank)
        per_sequence = [zigzag_split(seq, cp, rank, dim=1) for seq in x.split(lengths, dim=1)]
        assert torch.equal(part, torch.cat(per_sequence, dim=1))
        # position ids restart per sequence and are split like every other per-token tensor
        positions = zigzag_split_packed(packed_position_ids(lengths), cu, cp, rank, dim=0)
        expected = torch.cat([zigzag_indices(length, cp, rank) for length in lengths])
        assert torch.equal(positions, expected)
        parts.append(part)
    assert torch.equal(zigzag_merge_packed(parts, cu, cp), x)
    flat_parts = [part[0] for part in parts]  # [T/cp, 3] with dim=0
    assert torch.equal(zigzag_merge_packed(flat_parts, cu, cp, dim=0), x[0])


# --- errors ---


def test_errors_name_the_values():
    with pytest.raises(ValueError, match=r"S=10 is not a multiple of 2 \* cp = 4 \(cp=2\): pad it to 12"):
        zigzag_split(torch.zeros(1, 10), 2, 0)
    with pytest.raises(ValueError, match=r"S=6 is not a multiple of 2 \* cp = 8 \(cp=4\)"):
        zigzag_indices(6, 4, 0)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, cp_size=2\), got 2"):
        zigzag_split(torch.zeros(1, 8), 2, 2)
    with pytest.raises(ValueError, match="cp_size must be >= 1, got 0"):
        zigzag_indices(8, 0, 0)
    with pytest.raises(ValueError, match="one part per CP rank: 2 ranks, got 1 parts"):
        zigzag_merge([torch.zeros(1, 4)], 2)
    with pytest.raises(ValueError, match=r"rank 0 \(1, 4\), rank 1 \(1, 2\)"):
        zigzag_merge([torch.zeros(1, 4), torch.zeros(1, 2)], 2)
    with pytest.raises(ValueError, match=r"packed sequence 1's length S=6 is not a multiple of 2 \* cp = 4"):
        zigzag_indices_packed([0, 4, 10], 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        zigzag_indices_packed([2, 6], 2, 0)
    with pytest.raises(ValueError, match=r"non-decreasing: cu_seqlens\[1\]=8 > cu_seqlens\[2\]=4"):
        zigzag_indices_packed([0, 8, 4], 2, 0)
    with pytest.raises(ValueError, match="x has 12 tokens along dim 1 but cu_seqlens ends at 8"):
        zigzag_split_packed(torch.zeros(1, 12), [0, 4, 8], 2, 0)


# --- a real 2-process CP group over gloo ---


@pytest.mark.dist
def test_gather_from_cp_over_gloo(tmp_path):
    gen = torch.Generator().manual_seed(0)
    lengths = pad_for_cp([3, 5, 8], 2)  # [4, 8, 8]
    cu = cu_seqlens(lengths)
    inputs = {
        "dense": {
            "logp": -torch.rand(2, 16, generator=gen),  # [B, S] per-token log-probs
            "hidden": torch.randn(2, 16, 3, generator=gen),  # [B, S, H]
            "ids": torch.randint(0, 100, (2, 16), generator=gen),
        },
        "packed": {"logp": -torch.rand(1, int(cu[-1]), generator=gen)},
        "cu_seqlens": cu,
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    run_torchrun(WORKERS / "cp_gather.py", 2, [str(tmp_path / "inputs.pt"), str(tmp_path)], timeout=300)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for name, full in inputs["dense"].items():
            assert torch.equal(result["dense"][name], full), (rank, name)
        assert torch.equal(result["packed"]["logp"], inputs["packed"]["logp"])
        assert "does not carry gradients" in result["grad_error"]
        assert torch.equal(result["no_grad"], inputs["dense"]["logp"])
