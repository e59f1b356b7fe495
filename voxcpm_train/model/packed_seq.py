"""Packed rows as per-segment boundaries (`cu_seqlens`): megatron `PackedSeqParams` in the `thd` format.

The micro-batch carries its packing as `segment_ids` [B, T] (docs/architecture.md): a packed sample is a
contiguous run of one id, 0 marks the padding at the end of a row. In the THD layout the B rows are
concatenated into one token stream of B·T positions (row-major: token `b·T + t` is row b, position t) and
every maximal run of equal ids inside a row is one sequence; the padding run of a row is a sequence of
its own, so every token belongs to exactly one sequence and attention inside a sequence is what the dense
`[B, 1, T, T]` segment mask allowed (the padding only ever attends to padding).

`thd_packed_seq_params(segment_ids, B, T, device)` builds the params once per micro-batch (one host sync
when `segment_ids` live on an accelerator); every attention backend reads them:

- Transformer Engine (`TEDotProductAttention`): `cu_seqlens_q/kv` (int32, on the device) and `max_seqlen_q/kv`
  (int) with `qkv_format="thd"` (megatron turns the causal mask type into TE's `padding_causal`).
- Ascend (`npu_fusion_attention`, TND layout): `actual_seq_qlen/kvlen` = `cu_seqlens_host[1:]`.
- torch SDPA (CPU default): `sdpa_chunk_plan()` groups consecutive sequences into chunks of at most
  `max_seqlen` tokens; one SDPA call over the [chunks, max_seqlen] padded batch with a block-diagonal mask
  built inside the call (memory O(B·T·max_seqlen), never a [B·T, B·T] or per-row [T, T] tensor outside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class VoxPackedSeqParams(PackedSeqParams):
    """megatron `PackedSeqParams` plus the boundaries on the host (`cu_seqlens_host`, for the SDPA chunking
    and NPU's `actual_seq_qlen`, which take Python ints) and a per-micro-batch cache of host-side plans.
    Transformer Engine reads only the base class fields."""

    cu_seqlens_host: Tuple[int, ...] = ()
    cache: dict = field(default_factory=dict, repr=False, compare=False)


def segment_boundaries(segment_ids: Optional[torch.Tensor], B: int, T: int) -> np.ndarray:
    """int64 [N + 1] offsets of the N sequences of the B·T token stream (runs of equal `segment_ids`
    within a row; each row is one sequence when `segment_ids` is None)."""
    if segment_ids is None:
        return np.arange(0, B * T + 1, T, dtype=np.int64)
    seg = segment_ids.detach().to("cpu", torch.int64).numpy()
    if seg.shape != (B, T):
        raise ValueError(f"segment_ids has shape {tuple(seg.shape)}, expected [B, T] = {[B, T]}")
    starts = np.ones((B, T), dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return np.append(np.flatnonzero(starts.reshape(-1)), B * T).astype(np.int64)


def thd_packed_seq_params(segment_ids: Optional[torch.Tensor], B: int, T: int, device) -> VoxPackedSeqParams:
    """`VoxPackedSeqParams` (qkv_format thd) of a micro-batch's B rows of T positions."""
    cu = segment_boundaries(segment_ids, B, T)
    max_seqlen = int(np.diff(cu).max())
    cu_dev = torch.from_numpy(cu.astype(np.int32)).to(device, non_blocking=True)
    return VoxPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_dev, cu_seqlens_kv=cu_dev, max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen, cu_seqlens_host=tuple(int(x) for x in cu),
    )


@dataclass(frozen=True)
class SDPAChunkPlan:
    """Consecutive sequences grouped into G chunks of at most C tokens (C = the longest sequence).

    `gather` int64 [G, C]: token index of each chunk slot (t = the zero row for slots past the chunk's end);
    `sequence` int64 [G, C]: sequence number of the slot within its chunk (-1 for the empty slots);
    `scatter` int64 [t]: the slot (g·C + i) of each token; `one_per_chunk`: every chunk holds one sequence.
    """

    gather: torch.Tensor
    sequence: torch.Tensor
    scatter: torch.Tensor
    chunks: int
    capacity: int
    one_per_chunk: bool


def sdpa_chunk_plan(params: VoxPackedSeqParams, device) -> SDPAChunkPlan:
    """The chunking of `params` for SDPA (cached on `params` per device).

    Greedy first-fit in token order: a chunk closes when the next sequence does not fit, so two
    consecutive chunks hold more than C tokens and G·C² < 2·t·C + C² (t tokens)."""
    key = ("sdpa_plan", str(device))
    if key in params.cache:
        return params.cache[key]
    cu = np.asarray(params.cu_seqlens_host, dtype=np.int64)
    if cu.size < 2:
        raise ValueError("packed_seq_params.cu_seqlens_host is empty (build it with thd_packed_seq_params)")
    lengths = np.diff(cu)
    total, capacity = int(cu[-1]), int(lengths.max())
    chunk_of_seq = np.empty(len(lengths), dtype=np.int64)
    chunk, used = 0, 0
    for i, n in enumerate(lengths):
        if used and used + n > capacity:
            chunk, used = chunk + 1, 0
        chunk_of_seq[i] = chunk
        used += n
    chunks = chunk + 1
    chunk_start = cu[:-1][np.r_[True, chunk_of_seq[1:] != chunk_of_seq[:-1]]]  # first token of each chunk
    seq_of_token = np.repeat(np.arange(len(lengths)), lengths)
    chunk_of_token = chunk_of_seq[seq_of_token]
    slot_of_token = chunk_of_token * capacity + (np.arange(total) - chunk_start[chunk_of_token])
    gather = np.full(chunks * capacity, total, dtype=np.int64)
    gather[slot_of_token] = np.arange(total)
    first_seq_of_chunk = np.searchsorted(chunk_of_seq, np.arange(chunks))
    sequence = np.full(chunks * capacity, -1, dtype=np.int64)
    sequence[slot_of_token] = seq_of_token - first_seq_of_chunk[chunk_of_token]
    plan = SDPAChunkPlan(
        gather=torch.from_numpy(gather.reshape(chunks, capacity)).to(device),
        sequence=torch.from_numpy(sequence.reshape(chunks, capacity)).to(device),
        scatter=torch.from_numpy(slot_of_token).to(device),
        chunks=chunks, capacity=capacity, one_per_chunk=chunks == len(lengths),
    )
    params.cache[key] = plan
    return plan
