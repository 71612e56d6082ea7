"""What every decoder family's attention side shares: the batch, the MoE call, and the layer loop.

Legend: T tokens in the step, B sequences, D hidden, H query heads, Hkv key/value heads, Dh head
dim, K top-k, V vocab.

``DecoderSide.forward_steps`` is the loop all families run (Qwen3-MoE/Mixtral, DeepSeek-V2/V3,
GLM-4-MoE): embedding → per layer (residual add +) RMSNorm → the family's attention (its own
projections and backend, ``attention_out``; a family may fuse the norm in: ``attention_block``) →
post-attention norm → a dense SwiGLU MLP, or routing (``norm_and_route``) and a ``MoECall`` yielded to
whoever runs the experts (plus the shared experts where the layer has them) → final norm → logits. The
residual adds are fused into the next norm (``LayerOps.add_rms_norm``). A family subclasses it and
supplies the two hooks; layer weights need ``input_norm``, ``post_norm``, ``router`` (None for a dense
layer), ``dense_mlp`` and optionally ``shared_mlp``.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from epserve.model_config import ModelSpec
from epserve.models.ops import TORCH_OPS, LayerOps


@dataclass
class ForwardBatch:
    """One step's tokens. Sequences are contiguous runs of ``seq_lens`` new tokens each.

    The lists serve host-side backends (the CPU one walks sequences); ``device`` holds whatever
    a device backend prepared for this batch (block tables, lengths, ... as device tensors)."""

    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    seq_lens: list[int]              # new tokens per sequence, sum = T
    context_lens: list[int]          # tokens in the cache per sequence after this step
    block_tables: list[list[int]]    # KV blocks per sequence
    slot_mapping: torch.Tensor       # [T] flat KV-cache slot of each new token (-1: store nothing)
    logits_rows: torch.Tensor | None = None  # [B'] rows to compute logits for; None = all rows
    padding_rows: torch.Tensor | None = None  # [T, 1] bool, True = a padding row (CUDA graphs); None = none
    device: Any = None               # backend-specific device metadata (see attention_worker/)
    backend_state: dict = field(default_factory=dict)   # per-forward scratch of the backend

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class AttentionBackend(Protocol):
    def forward(self, layer: int, qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) Dh] (q heads, then k, then v) → attention output [T, H Dh]:
        per-head RMSNorm of q and k (none when q_norm/k_norm are None), RoPE at ``batch.positions``,
        the new k/v stored in the paged cache at ``batch.slot_mapping``, causal attention over each
        sequence's cached context."""
        ...


@dataclass
class MoECall:
    """What the attention side needs from the experts for one MoE layer."""

    moe_layer: int                   # index among MoE layers (L index of the expert map)
    hidden: torch.Tensor             # [T, D] post-attention-normed hidden states
    topk_ids: torch.Tensor           # [T, K] logical expert ids
    topk_weights: torch.Tensor       # [T, K]
    padding_rows: torch.Tensor | None = None  # [T, 1] bool: True rows are padding, routed nowhere


def swiglu(x: torch.Tensor, mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, D], (gate [I, D], up [I, D], down [D, I]) → [T, D]."""
    gate, up, down = mlp
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class DecoderSide:
    """The layer loop; subclasses give ``attention_out`` and ``norm_and_route``."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list, final_norm: torch.Tensor,
                 lm_head: torch.Tensor, ops: LayerOps = TORCH_OPS) -> None:
        self.spec = spec
        self.embed = embed               # [V, D]
        self.layers = layers
        self.final_norm = final_norm     # [D]
        self.lm_head = lm_head           # [V, D]
        self.ops = ops
        self.dtype = embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def attention_out(self, index: int, x: torch.Tensor, w, batch: ForwardBatch, attention) -> torch.Tensor:
        """Layer ``index``'s attention block on the normed x [T, D] → [T, D] (after its output projection)."""
        raise NotImplementedError

    def attention_block(self, index: int, delta: torch.Tensor | None, residual: torch.Tensor, w,
                        batch: ForwardBatch, attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` from the residual stream: (residual add +) input norm + ``attention_out`` →
        (attention block output [T, D], the new residual [T, D]). ``delta`` [T, D]: what the previous
        layer adds to ``residual`` (None at the first layer)."""
        eps = self.spec.rms_norm_eps
        if delta is None:
            x = self.ops.rms_norm(residual, w.input_norm, eps)
        else:
            x, residual = self.ops.add_rms_norm(delta, residual, w.input_norm, eps)
        return self.attention_out(index, x, w, batch, attention), residual

    def norm_and_route(self, attn: torch.Tensor, residual: torch.Tensor, w
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A MoE layer's residual add + post-attention norm + routing → (x [T, D], residual [T, D],
        topk_ids [T, K], topk_weights [T, K])."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward_steps(self, batch: ForwardBatch, attention) -> Generator[MoECall, torch.Tensor, torch.Tensor]:
        """Yields a MoECall per MoE layer (send back [T, D]); returns logits [rows, V] (float32)."""
        spec, ops, eps = self.spec, self.ops, self.spec.rms_norm_eps
        residual = F.embedding(batch.input_ids, self.embed)                      # [T, D]
        delta = None                     # what the next norm adds to the residual stream
        for index, w in enumerate(self.layers):
            attn, residual = self.attention_block(index, delta, residual, w, batch, attention)   # [T, D] each
            if w.router is None:
                x, residual = ops.add_rms_norm(attn, residual, w.post_norm, eps)
                delta = swiglu(x, w.dense_mlp)
                continue
            x, residual, topk_ids, topk_weights = self.norm_and_route(attn, residual, w)
            delta = yield MoECall(spec.moe_index(index), x, topk_ids, topk_weights, batch.padding_rows)
            shared = getattr(w, "shared_mlp", None)
            if shared is not None:
                delta = delta + swiglu(x, shared)
        if batch.logits_rows is not None:
            delta, residual = delta[batch.logits_rows], residual[batch.logits_rows]
        hidden, _ = ops.add_rms_norm(delta, residual, self.final_norm, eps)
        return F.linear(hidden, self.lm_head).float()
