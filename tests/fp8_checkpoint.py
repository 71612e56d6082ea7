"""``dequantized_copy(fp8_dir, out_dir)``: a float32 copy of an FP8 block-quantized checkpoint (one
model.safetensors), its weights multiplied out block by block here, independently of epserve's loader,
and config.json without ``quantization_config``; the reference the FP8 tests compare epserve against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def dequantized_copy(model_dir: Path, out_dir: Path) -> Path:
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    n, k = config.pop("quantization_config")["weight_block_size"]
    (out_dir / "config.json").write_text(json.dumps(config))
    tensors = {}
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
        for name in names:
            if name.endswith("_scale_inv"):
                continue
            tensor = f.get_tensor(name)
            if name + "_scale_inv" in names:
                scale = f.get_tensor(name + "_scale_inv")
                assert tensor.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
                values = tensor.float()
                for i in range(scale.shape[0]):
                    for j in range(scale.shape[1]):
                        values[i * n:(i + 1) * n, j * k:(j + 1) * k] *= scale[i, j]
                tensor = values
            tensors[name] = tensor.float()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
