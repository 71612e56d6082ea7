"""``deep_gemm``: DeepGEMM's bf16 grouped GEMMs, contiguous layout for prefill, masked for decode.

Legend: T tokens, D hidden size, I intermediate size, S local slots, K top-k, A = T*K,
M rows per slot in the masked layout.

- Prefill (T > DECODE_MAX_TOKENS): rows sorted by slot and padded to DeepGEMM's M alignment
  (``kernels.moe_align``), ``m_indices`` = slot per row (-1 for padding), two
  ``m_grouped_bf16_gemm_nt_contiguous`` calls with SiLU·mul between them.
- Decode: rows packed into [S, M, D] with ``masked_m`` = rows per slot, two
  ``m_grouped_bf16_gemm_nt_masked`` calls.
Both scale rows by the top-k weights, scatter them to assignment order and sum them with
``kernels.moe_down.combine``. No host sync. The library is imported and smoke-tested when the
runner is built; if it does not load or its GEMM fails, building fails with an ImportError
that names it. (On the H200 machine, torch 2.11: no sgl-deep-gemm wheel works; see
bench/results/moe_kernels_h200.md.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.moe_runner.base import MoERunnerConfig

DECODE_MAX_TOKENS = 256


def _load_deep_gemm():
    try:
        import deep_gemm
    except Exception as e:  # an ImportError, or an OSError / undefined symbol from its extension
        raise ImportError(f"--moe-runner-backend deep_gemm needs the `deep_gemm` library "
                          f"(DeepGEMM, e.g. the sgl-deep-gemm wheel) built for this torch; "
                          f"importing it failed: {type(e).__name__}: {e}") from e
    for fn in ("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked"):
        if not hasattr(deep_gemm, fn):
            raise ImportError(f"this deep_gemm build has no {fn} (bf16 grouped GEMM)")
    return deep_gemm


def _rows_of(align, num_slots: int):
    """Per padded position: its slot (-1 past a slot's count) and its rank within the slot."""
    cap = align.sorted_ids.numel()
    r = torch.arange(cap, device=align.sorted_ids.device, dtype=torch.int32)
    slot = torch.searchsorted(align.slot_offsets[1:], r, right=True)            # [cap] in [0, S]
    safe = slot.clamp(max=num_slots - 1)
    rank = r - align.slot_offsets[safe]
    real = (slot < num_slots) & (rank < align.slot_counts[safe])
    return torch.where(real, safe, -1).to(torch.int32), rank, real


class DeepGemmMoERunner:
    name = "deep_gemm"

    def __init__(self, deep_gemm) -> None:
        self._dg = deep_gemm

    def run(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor,
            w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], slot_ids [T, K], weights [T, K], w13 [S, 2I, D], w2 [S, D, I] → [T, D]."""
        if hidden.dtype != torch.bfloat16:
            raise ValueError(f"deep_gemm runs bf16 experts only (got {hidden.dtype})")
        if hidden.shape[0] == 0:
            return torch.zeros_like(hidden)
        if hidden.shape[0] <= DECODE_MAX_TOKENS:
            rows = self._masked(hidden, slot_ids, weights, w13, w2)
        else:
            rows = self._contiguous(hidden, slot_ids, weights, w13, w2)
        from epserve.kernels.moe_down import combine
        return combine(rows, slot_ids)

    def _scatter_rows(self, y, aid, real, weights, num_assignments):
        """y [R, D] rows of assignments aid (where real) → rows [A, D], weighted."""
        scale = torch.where(real, weights.reshape(-1).float()[aid.long()], 0.0)
        dest = torch.where(real, aid.long(), num_assignments)
        rows = torch.empty(num_assignments + 1, y.shape[1], dtype=y.dtype, device=y.device)
        rows.index_copy_(0, dest, (y.float() * scale[:, None]).to(y.dtype))
        return rows[:num_assignments]

    def _contiguous(self, hidden, slot_ids, weights, w13, w2):
        from epserve.kernels.moe_align import align_by_slot
        num_slots, inter = w13.shape[0], w2.shape[2]
        top_k = slot_ids.shape[1]
        align = align_by_slot(slot_ids, num_slots, self._dg.get_mk_alignment_for_contiguous_layout())
        m_indices, _, real = _rows_of(align, num_slots)
        aid = torch.where(real, align.sorted_ids, 0)
        a = torch.where(real[:, None], hidden[aid.long() // top_k], 0)                  # [cap, D]
        gate_up = torch.empty(a.shape[0], 2 * inter, dtype=a.dtype, device=a.device)
        self._dg.m_grouped_bf16_gemm_nt_contiguous(a, w13, gate_up, m_indices)
        act = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(a.dtype)
        y = torch.empty(a.shape[0], w2.shape[1], dtype=a.dtype, device=a.device)
        self._dg.m_grouped_bf16_gemm_nt_contiguous(act, w2, y, m_indices)
        return self._scatter_rows(y, aid, real, weights, slot_ids.numel())

    def _masked(self, hidden, slot_ids, weights, w13, w2):
        from epserve.kernels.moe_align import align_by_slot
        num_slots, inter = w13.shape[0], w2.shape[2]
        num_tokens, top_k = slot_ids.shape
        max_m = -(-num_tokens // 64) * 64            # a slot gets each token at most once
        align = align_by_slot(slot_ids, num_slots, 1)
        slot, rank, real = _rows_of(align, num_slots)
        aid = torch.where(real, align.sorted_ids, 0)
        packed = torch.where(real, slot.long() * max_m + rank.long(), num_slots * max_m)
        a = torch.empty(num_slots * max_m + 1, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        a.index_copy_(0, packed, hidden[aid.long() // top_k])
        a = a[:num_slots * max_m].view(num_slots, max_m, -1)                           # [S, M, D]
        expected_m = max(1, -(-num_tokens * top_k // num_slots))
        gate_up = torch.empty(num_slots, max_m, 2 * inter, dtype=a.dtype, device=a.device)
        self._dg.m_grouped_bf16_gemm_nt_masked(a, w13, gate_up, align.slot_counts, expected_m)
        act = (F.silu(gate_up[..., :inter].float()) * gate_up[..., inter:].float()).to(a.dtype)
        y = torch.empty(num_slots, max_m, w2.shape[1], dtype=a.dtype, device=a.device)
        self._dg.m_grouped_bf16_gemm_nt_masked(act, w2, y, align.slot_counts, expected_m)
        y = y.view(num_slots * max_m, -1)[packed.clamp(max=num_slots * max_m - 1)]
        return self._scatter_rows(y, aid, real, weights, slot_ids.numel())


def _smoke_test(deep_gemm, device: torch.device) -> None:
    """One tiny contiguous grouped GEMM: prebuilt wheels can import on a torch whose ABI they
    do not match and fail only when called (seen: sgl-deep-gemm 0.2.0 / 0.1.7 on torch 2.11)."""
    groups, m, n, k = 2, deep_gemm.get_mk_alignment_for_contiguous_layout(), 128, 128
    a = torch.randn(groups * m, k, device=device).bfloat16()
    b = torch.randn(groups, n, k, device=device).bfloat16()
    d = torch.empty(groups * m, n, device=device, dtype=torch.bfloat16)
    m_indices = torch.arange(groups, device=device, dtype=torch.int32).repeat_interleave(m)
    try:
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
        torch.cuda.synchronize(device)
    except Exception as e:
        raise ImportError(f"--moe-runner-backend deep_gemm: the `deep_gemm` library imports but its bf16 "
                          f"grouped GEMM fails ({type(e).__name__}: {e}); the build does not match this "
                          f"torch ({torch.__version__})") from e
    ref = torch.einsum("gmk,gnk->gmn", a.view(groups, m, k).float(), b.float()).reshape(groups * m, n)
    if ((d.float() - ref).norm() / ref.norm()).item() > 1e-2:
        raise ImportError("--moe-runner-backend deep_gemm: the `deep_gemm` library's bf16 grouped GEMM "
                          "returns wrong results on this machine")


def make_deep_gemm_runner(config: MoERunnerConfig) -> DeepGemmMoERunner:
    deep_gemm = _load_deep_gemm()
    if config.device.type != "cuda":
        raise ValueError(f"--moe-runner-backend deep_gemm needs a CUDA device (got {config.device})")
    _smoke_test(deep_gemm, config.device)
    return DeepGemmMoERunner(deep_gemm)

