"""Tuned kernel configurations for the fused MoE, per (S, D, I, device), chosen by token count.

Legend: S local slots, D hidden, I intermediate, T tokens.

Like SGLang's ``fused_moe_triton/configs``: one JSON file per shape and device in
``kernels/configs/``, mapping a token count to a config; the entry with the nearest token
count is used. A missing file falls back to a heuristic by rows per slot. Files are written
by ``bench/gpu/tune_moe.py`` on the device and copied here.

An entry is either ``{"variant": "gemv", ...GemvConfig fields}`` or
``{"variant": "aligned", "gate_up": {...GemmConfig}, "down": {...GemmConfig}}``; a GEMM
config with ``"tma": true`` selects that kernel's TMA variant, ``"split": true`` its split
variant (segments padded to block_m / 2, half-height tile for an odd remainder),
``"persistent": true`` (split only) its persistent variant (``ctas_per_sm`` programs per SM
loop over the tiles), and ``"tma_store": true`` (TMA variants) stores the output tiles
through TMA as well.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from epserve.kernels.moe_gate_up import (GemmConfig, PersistentSplitTmaGemmConfig, SplitTmaGemmConfig, TmaGemmConfig,
                                 alignment_block)
from epserve.kernels.moe_gemv import GemvConfig

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class AlignedConfig:
    gate_up: GemmConfig
    down: GemmConfig

    def __post_init__(self) -> None:
        down_rows = self.down.block_m // 2 if isinstance(self.down, SplitTmaGemmConfig) else self.down.block_m
        assert self.align_block_m % down_rows == 0, "the down tiles must divide the alignment's BLOCK_M"

    @property
    def align_block_m(self) -> int:
        """Rows each slot's segment is padded to (set by the gate_up config)."""
        return alignment_block(self.gate_up)


MoEConfig = GemvConfig | AlignedConfig


def config_to_dict(config: MoEConfig) -> dict:
    if isinstance(config, GemvConfig):
        return {"variant": "gemv", **asdict(config)}
    return {"variant": "aligned", "gate_up": _gemm_to_dict(config.gate_up), "down": _gemm_to_dict(config.down)}


def _gemm_to_dict(config: GemmConfig) -> dict:
    extra = {"tma": True} if isinstance(config, TmaGemmConfig) else {}
    if isinstance(config, SplitTmaGemmConfig):
        extra["split"] = True
    if isinstance(config, PersistentSplitTmaGemmConfig):
        extra["persistent"] = True
    fields = asdict(config)
    if not fields.get("tma_store", True):
        del fields["tma_store"]                    # the default: keeps older tables unchanged
    return {**fields, **extra}


def _gemm_from_dict(entry: dict) -> GemmConfig:
    entry = dict(entry)
    tma, split, persistent = entry.pop("tma", False), entry.pop("split", False), entry.pop("persistent", False)
    cls = (PersistentSplitTmaGemmConfig if persistent else SplitTmaGemmConfig if split
           else TmaGemmConfig if tma else GemmConfig)
    return cls(**entry)


def config_from_dict(entry: dict) -> MoEConfig:
    entry = dict(entry)
    variant = entry.pop("variant")
    if variant == "gemv":
        return GemvConfig(**entry)
    if variant == "aligned":
        return AlignedConfig(_gemm_from_dict(entry["gate_up"]), _gemm_from_dict(entry["down"]))
    raise ValueError(f"unknown fused-MoE config variant {variant!r}")


def config_file_name(num_slots: int, dim: int, inter: int, device_name: str) -> str:
    return f"S={num_slots},D={dim},I={inter},device={device_name.replace(' ', '_')}.json"


# Cards of one architecture (same SM count class, shared memory, TMA): a table tuned on one is a far
# better start on another than the generic heuristic (measured: H100 with the H200's table vs default
# in bench/results/serve_gpu.md). Substring of the device name → the device whose tables stand in.
SAME_ARCHITECTURE = {"H100": "NVIDIA H200", "H800": "NVIDIA H200", "H20": "NVIDIA H200", "GH200": "NVIDIA H200"}


def stand_in_device(device_name: str) -> str | None:
    """The device whose tuned tables serve ``device_name`` when it has none of its own."""
    for key, other in SAME_ARCHITECTURE.items():
        if key in device_name and other != device_name:
            return other
    return None


@functools.lru_cache(maxsize=64)
def load_config_table(num_slots: int, dim: int, inter: int, device_name: str) -> dict[int, MoEConfig] | None:
    """The tuned table for this shape on this device, else the one tuned on a card of the same
    architecture (logged once), else None (the heuristic ``default_config``)."""
    path = CONFIG_DIR / config_file_name(num_slots, dim, inter, device_name)
    if not path.exists():
        other = stand_in_device(device_name)
        if other is None or not (CONFIG_DIR / config_file_name(num_slots, dim, inter, other)).exists():
            return None
        logger.info("no tuned fused-MoE table for S=%d D=%d I=%d on %s: using %s's (same architecture; "
                    "bench/gpu/tune_moe.py tunes one)", num_slots, dim, inter, device_name, other)
        path = CONFIG_DIR / config_file_name(num_slots, dim, inter, other)
    return {int(t): config_from_dict(e) for t, e in json.loads(path.read_text()).items()}


def default_config(num_tokens: int, top_k: int, num_slots: int) -> MoEConfig:
    """Heuristic for shapes without a tuned table (rows per slot if every choice were local)."""
    if num_tokens <= 4:
        return GemvConfig(block_n=8, block_k=1024, num_warps=4, down_block_n=4, down_block_k=256)
    rows_per_slot = num_tokens * top_k / max(num_slots, 1)
    if rows_per_slot <= 16:
        gemm = GemmConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)
        return AlignedConfig(gemm, gemm)
    if rows_per_slot <= 64:
        gemm = GemmConfig(32, 64, 128, group_m=8, num_warps=4, num_stages=4)
        return AlignedConfig(gemm, gemm)
    if rows_per_slot <= 256:
        gemm = GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)
        return AlignedConfig(gemm, gemm)
    return AlignedConfig(GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
                         GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4))


def get_config(num_tokens: int, top_k: int, num_slots: int, dim: int, inter: int,
               device_name: str) -> MoEConfig:
    table = load_config_table(num_slots, dim, inter, device_name)
    if not table:
        return default_config(num_tokens, top_k, num_slots)
    nearest = min(table, key=lambda t: (abs(t - num_tokens), t))
    return table[nearest]
