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

FP8 block-quantized checkpoints (``ModelSpec.quantization``, DeepSeek-V3's release): a weight stored as
float8_e4m3fn with a ``<name>_scale_inv`` [ceil(N / n), ceil(K / k)] is dequantized wherever it is
read (``read``, ``read_experts``): weight * scale_inv per (n, k) block in float32, then cast to the
requested dtype (as DeepSeek's ``weight_dequant`` and transformers' ``Fp8Dequantize`` compute it), on
the destination device (the FP8 bytes travel, not the float ones). ``quantize_fp8_blocks`` is the
inverse DeepSeek applies (scale_inv = amax / 448 per block); the tiny-model maker and the dummy
reader use it. Which tensors a block-quantized checkpoint quantizes: ``is_block_quantized``.

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

from epserve.model_config import BlockQuantization, ExpertNames, ModelConfigError, block_quantization

FP8_MAX = 448.0                      # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
# 2-D weights a block-quantized checkpoint keeps in float (DeepSeek-V3's release, transformers' FP8 loader):
# embeddings, the lm_head, routers; norms and biases are 1-D
NOT_BLOCK_QUANTIZED = ("model.embed_tokens.weight", "lm_head.weight", ".mlp.gate.weight",
                       ".block_sparse_moe.gate.weight")


def is_block_quantized(name: str, shape: Sequence[int]) -> bool:
    """Whether a block-quantized checkpoint stores tensor ``name`` of ``shape`` in FP8: every Linear
    projection's weight (attention, dense MLPs, shared and routed experts), nothing else."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(NOT_BLOCK_QUANTIZED) \
        and not name.endswith("norm.weight")


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] → (float8_e4m3fn [N, K], scale_inv float32 [ceil(N / n), ceil(K / k)]) as DeepSeek
    quantizes: per (n, k) block (the last ones partial), scale_inv = amax / 448 and weight / scale_inv
    rounded to nearest e4m3 (an all-zero block keeps scale_inv 0 and zeros)."""
    rows, cols = weight.shape
    n, k = block
    nb, kb = -(-rows // n), -(-cols // k)
    padded = weight.new_zeros(nb * n, kb * k, dtype=torch.float32)
    padded[:rows, :cols] = weight
    blocks = padded.view(nb, n, kb, k)
    scale_inv = blocks.abs().amax(dim=(1, 3)) / FP8_MAX                                  # [nb, kb]
    divisor = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))[:, None, :, None]
    quantized = (blocks / divisor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.view(nb * n, kb * k)[:rows, :cols].contiguous(), scale_inv


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          name: str = "weight") -> torch.Tensor:
    """float8_e4m3fn [N, K] and scale_inv [ceil(N / n), ceil(K / k)] → float32 [N, K] (on weight's device):
    each (n, k) block times its scale_inv."""
    rows, cols = weight.shape
    n, k = block
    expected = (-(-rows // n), -(-cols // k))
    if tuple(scale_inv.shape) != expected:
        raise ModelConfigError(f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}; a [{rows}, {cols}] weight "
                               f"in blocks of {list(block)} needs {list(expected)}")
    out = weight.to(torch.float32)
    row_scales = scale_inv.to(device=out.device, dtype=torch.float32).repeat_interleave(n, dim=0)[:rows]  # [N, Kb]
    full, rest = divmod(cols, k)
    out[:, :full * k].unflatten(1, (full, k)).mul_(row_scales[:, :full, None])
    if rest:
        out[:, full * k:].mul_(row_scales[:, full:])
    return out


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
        config_file = self.model_dir / "config.json"
        self.quantization: BlockQuantization | None = block_quantization(
            json.loads(config_file.read_text()), config_file) if config_file.is_file() else None

    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` is stored in FP8 with block scales (read dequantized)."""
        return self.quantization is not None and name + SCALE_SUFFIX in self.weight_map

    def _dequantized(self, name: str, device: torch.device | str) -> torch.Tensor:
        """A quantized tensor, dequantized to float32 on ``device``."""
        weight = self._open(self.weight_map[name]).get_tensor(name)
        if weight.dtype != torch.float8_e4m3fn:
            raise ModelConfigError(f"checkpoint {self.model_dir}: {name} has a {SCALE_SUFFIX} but is stored as "
                                   f"{weight.dtype}, not float8_e4m3fn (the config's fmt e4m3)")
        scale_name = name + SCALE_SUFFIX
        scale_inv = self._open(self.weight_map[scale_name]).get_tensor(scale_name)
        if not scale_inv.dtype.is_floating_point or scale_inv.dtype.itemsize < 2:
            raise ModelConfigError(f"checkpoint {self.model_dir}: {scale_name} is {scale_inv.dtype}; only float "
                                   "scales are read (not byte-coded ue8m0 ones)")
        return dequantize_fp8_blocks(weight.to(device), scale_inv, self.quantization.weight_block_size, name)

    def _converted(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """One whole tensor in ``dtype`` on ``device`` (dequantized if it is quantized)."""
        if self.is_quantized(name):
            return self._dequantized(name, device).to(dtype)
        tensor = self._open(self.weight_map[name]).get_tensor(name)
        self._check_not_float8(name, tensor)
        return tensor.to(device=device, dtype=dtype)

    def _source(self, name: str, device: torch.device | str) -> torch.Tensor:
        """What to copy from into a destination: a zero-copy view of ``name`` in the mapped file, or
        its float32 dequantization on ``device`` when it is quantized."""
        if self.is_quantized(name):
            return self._dequantized(name, device)
        view = self.view(name)
        self._check_not_float8(name, view)
        return view

    def _check_not_float8(self, name: str, tensor: torch.Tensor) -> None:
        """FP8 values mean nothing without their scales: refuse to cast them."""
        if tensor.dtype in _FLOAT8_DTYPES:
            raise ModelConfigError(f"checkpoint {self.model_dir}: {name} is stored as {tensor.dtype} without "
                                   f"{name}{SCALE_SUFFIX}, or config.json has no FP8 quantization_config; "
                                   "it cannot be read as it is")

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
                for name in file_names:
                    out[name] = self._converted(name, dtype, device)
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
        if self.has(fused) and self.is_quantized(fused):
            raise ModelConfigError(f"checkpoint {self.model_dir}: FP8 fused expert tensors ({fused}) are not read; "
                                   "use per-expert tensors or a bf16 checkpoint")
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
                gate, up, down = (self._source(name, out[e][0].device) for name in per_expert[e])
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
        if self.is_quantized(name):
            raise ModelConfigError(f"checkpoint {self.model_dir}: rows of the FP8 tensor {name} are not read")
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
_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
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
