"""Checkpoint reading: config.json + safetensors, one file or sharded, tensor by tensor.

``CheckpointReader`` maps tensor names to their files (``model.safetensors`` or the
``model.safetensors.index.json`` weight map) and reads only the tensors asked for, opening
each file once (memory-mapped, kept open) and showing a progress bar on stderr. Expert
tensors may be stored per expert (Hub format, ``...mlp.experts.{e}.gate_proj.weight``) or
fused (``...mlp.experts.gate_up_proj [E, 2I, D]``); ``read_experts`` handles both and, for
fused tensors, reads only the rows of the requested experts. Given destination tensors it
copies straight from the mapped file into them (one copy: a live map change on a CPU expert
worker competes with serving for the same cores). ``read_rows`` reads single rows of a stored
tensor (one expert of GPT-OSS's fused, transposed layout, which ``models/gpt_oss.py`` unpacks).

``tensors_read`` counts what was read, so callers (and tests) can see that an expert
worker given a list of slots touched only those experts.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from epserve.model_config import ExpertNames, ModelConfigError


class CheckpointReader:
    def __init__(self, model_path: str | Path, show_progress: bool = True) -> None:
        self.model_dir = Path(model_path)
        self.show_progress = show_progress
        self.tensors_read: list[str] = []
        self._handles: dict[Path, object] = {}      # open (memory-mapped) shards, reused across reads
        self._maps: dict[Path, tuple[mmap.mmap, dict, int]] = {}   # raw maps: (map, header, data start)
        self._handles_lock = threading.Lock()
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

    def _open(self, file: Path):
        """The shard's safetensors handle, opened once: a map change that reloads a few experts
        does not parse the header again (an expert worker reads the same shards many times)."""
        with self._handles_lock:
            if file not in self._handles:
                self._handles[file] = safe_open(file, framework="pt")
            return self._handles[file]

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy tensor over ``name``'s bytes in the mapped file (copy-on-write mapping:
        writing to it never changes the file). Copy out of it; do not keep it."""
        file = self.weight_map[name]
        with self._handles_lock:
            if file not in self._maps:
                with open(file, "rb") as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
                    self._maps[file] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), header, 8 + header_len)
            mapped, header, data_start = self._maps[file]
        entry = header[name]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin) if count else \
            torch.empty(0, dtype=dtype)
        return flat.view(entry["shape"])

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
        with self.progress(len(names), desc) as bar:
            for file, file_names in by_file.items():
                handle = self._open(file)
                for name in file_names:
                    out[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
                    self.tensors_read.append(name)
                    bar.update(1)
        return out

    def read_experts(self, layer: int, experts: Iterable[int], dtype: torch.dtype,
                     device: torch.device | str = "cpu", desc: str = "loading experts",
                     out: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     names: ExpertNames = ExpertNames()) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Decoder layer ``layer``'s experts → {expert: (w13 [2I, D], w2 [D, I])}.

        With ``out`` ({expert: (w13, w2)} destinations of those shapes), the tensors are copied
        into them (no intermediate [2I, D] concatenation) and ``out`` is returned. ``names``: the
        family's expert tensor names (``ModelSpec.expert_names``)."""
        experts = list(dict.fromkeys(experts))
        if out is None:
            out = {}
        fused, down_name = names.fused(layer)
        if self.has(fused):
            if all(e in out for e in experts):                 # straight from the mapped file
                gate_up, down = self.view(fused), self.view(down_name)
                for e in experts:
                    out[e][0].copy_(gate_up[e])
                    out[e][1].copy_(down[e])
            else:
                gate_up = self._open(self.weight_map[fused]).get_slice(fused)
                w13 = {e: _store(out.get(e, (None, None))[0], gate_up[e], device, dtype) for e in experts}
                down = self._open(self.weight_map[down_name]).get_slice(down_name)
                for e in experts:
                    out[e] = (w13[e], _store(out.get(e, (None, None))[1], down[e], device, dtype))
            self.tensors_read.extend(f"{fused.removesuffix('.gate_up_proj')}.{e}" for e in experts)
            return out
        per_expert = {e: names.per_expert(layer, e) for e in experts}
        if all(e in out for e in experts):                     # straight from the mapped file
            for e in experts:
                gate, up, down = (self.view(name) for name in per_expert[e])
                w13_out, w2_out = out[e]
                w13_out[:gate.shape[0]].copy_(gate)
                w13_out[gate.shape[0]:].copy_(up)
                w2_out.copy_(down)
            self.tensors_read.extend(name for e in experts for name in per_expert[e])
            return out
        tensors = self.read([name for e in experts for name in per_expert[e]], dtype, device, desc)
        for e in experts:
            gate, up, down = (tensors[name] for name in per_expert[e])
            out[e] = (torch.cat([gate, up], dim=0), down)
        return out

    def read_rows(self, name: str, rows: Sequence[int], dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` along its first dim: [len(rows), ...] in ``dtype`` on ``device``;
        only those rows are read (one expert of a fused [E, ...] tensor, GPT-OSS's layout)."""
        if name not in self.weight_map:
            raise ModelConfigError(f"checkpoint {self.model_dir} lacks tensor {name}")
        sliced = self._open(self.weight_map[name]).get_slice(name)
        out = torch.stack([sliced[row] for row in rows]).to(device=device, dtype=dtype)
        self.tensors_read.extend(f"{name}[{row}]" for row in rows)
        return out

    def progress(self, total: int, desc: str):
        """A progress bar on stderr (off for small totals or ``show_progress=False``)."""
        return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                    disable=not self.show_progress or total < 64, leave=False)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
if hasattr(torch, "float8_e4m3fn"):
    _SAFETENSORS_DTYPES.update(F8_E4M3=torch.float8_e4m3fn, F8_E5M2=torch.float8_e5m2)


def _store(destination: torch.Tensor | None, tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    """``tensor`` converted, or copied into ``destination`` when one is given."""
    if destination is None:
        return tensor.to(device=device, dtype=dtype)
    return destination.copy_(tensor)


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown --dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]
