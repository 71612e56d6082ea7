"""Checkpoint reading: config.json + safetensors, one file or sharded, tensor by tensor.

``CheckpointReader`` maps tensor names to their files (``model.safetensors`` or the
``model.safetensors.index.json`` weight map) and reads only the tensors asked for, opening
each file once per call and showing a progress bar on stderr. Expert tensors may be stored
per expert (Hub format, ``...mlp.experts.{e}.gate_proj.weight``) or fused
(``...mlp.experts.gate_up_proj [E, 2I, D]``); ``read_expert`` handles both and, for fused
tensors, reads only the rows of the requested expert.

``tensors_read`` counts what was read, so callers (and tests) can see that an expert
worker given a list of slots touched only those experts.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from epserve.model_config import ModelConfigError


class CheckpointReader:
    def __init__(self, model_path: str | Path, show_progress: bool = True) -> None:
        self.model_dir = Path(model_path)
        self.show_progress = show_progress
        self.tensors_read: list[str] = []
        index_file = self.model_dir / "model.safetensors.index.json"
        single_file = self.model_dir / "model.safetensors"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self.weight_map = {name: self.model_dir / file for name, file in weight_map.items()}
        elif single_file.is_file():
            with safe_open(single_file, framework="pt") as handle:
                self.weight_map = {name: single_file for name in handle.keys()}
        else:
            raise ModelConfigError(f"{self.model_dir} has neither model.safetensors nor "
                                   "model.safetensors.index.json")
        missing = {str(f) for f in self.weight_map.values() if not f.is_file()}
        if missing:
            raise ModelConfigError(f"checkpoint shards listed in the index are missing: {sorted(missing)}")

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: Iterable[str], dtype: torch.dtype, device: torch.device | str = "cpu",
             desc: str = "loading weights") -> dict[str, torch.Tensor]:
        """Read whole tensors by name, converted to ``dtype`` on ``device``."""
        names = list(names)
        unknown = [n for n in names if n not in self.weight_map]
        if unknown:
            raise ModelConfigError(f"checkpoint {self.model_dir} lacks tensors {unknown[:5]}"
                                   f"{' …' if len(unknown) > 5 else ''}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        with self._progress(len(names), desc) as bar:
            for file, file_names in by_file.items():
                with safe_open(file, framework="pt") as handle:
                    for name in file_names:
                        out[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
                        self.tensors_read.append(name)
                        bar.update(1)
        return out

    def read_experts(self, layer: int, experts: Iterable[int], dtype: torch.dtype,
                     device: torch.device | str = "cpu", desc: str = "loading experts"
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Decoder layer ``layer``'s experts → {expert: (w13 [2I, D], w2 [D, I])}."""
        experts = list(dict.fromkeys(experts))
        prefix = f"model.layers.{layer}.mlp.experts"
        fused = f"{prefix}.gate_up_proj"
        if self.has(fused):
            down_name = f"{prefix}.down_proj"
            with safe_open(self.weight_map[fused], framework="pt") as handle:
                gate_up = handle.get_slice(fused)
                w13 = {e: gate_up[e].to(device=device, dtype=dtype) for e in experts}
            with safe_open(self.weight_map[down_name], framework="pt") as handle:
                down = handle.get_slice(down_name)
                out = {e: (w13[e], down[e].to(device=device, dtype=dtype)) for e in experts}
            self.tensors_read.extend(f"{prefix}.{e}" for e in experts)
            return out
        names = [f"{prefix}.{e}.{p}.weight" for e in experts for p in ("gate_proj", "up_proj", "down_proj")]
        tensors = self.read(names, dtype, device, desc)
        out = {}
        for e in experts:
            gate, up, down = (tensors[f"{prefix}.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
            out[e] = (torch.cat([gate, up], dim=0), down)
        return out

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                    disable=not self.show_progress or total < 64, leave=False)


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown --dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]
