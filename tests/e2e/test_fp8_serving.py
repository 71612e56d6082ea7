"""An FP8 block-quantized DeepSeek-V3 checkpoint (DeepSeek's release format, 128 x 128 blocks) served end to
end by ``epserve up``, disaggregated (2 attention + 2 expert workers, 2 redundant experts): every process
that reads a quantized tensor dequantizes it, so the greedy text equals that of the same deployment on a
float checkpoint holding the dequantized weights (float64: both hold exactly the same values)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from epserve.gateway.client import generate
from epserve_up import epserve_up
from fp8_checkpoint import dequantized_copy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [f"Story {i}: the {w} was" for i, w in enumerate(["river", "mountain", "lantern", "garden", "engine"])]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def fp8_model(tiny_model_factory) -> Path:
    # moe_intermediate_size 128: whole 128-column blocks per expert, as SGLang's divisibility rule asks
    return tiny_model_factory(seed=3, arch="deepseek_v3", num_layers=3, num_experts=16, top_k=2, router_skew=1.2,
                              moe_intermediate_size=128, quantization="fp8")


def served_texts(model: Path, log_dir: Path) -> list[str]:
    args = ["--model-path", str(model), "--dtype", "float64", "--attention-workers", "2", "--expert-workers", "2",
            "--ep-num-redundant-experts", "2"]
    with epserve_up(args, log_dir) as endpoints:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(lambda p: generate(endpoints["gateway"], p, max_new_tokens=MAX_NEW_TOKENS,
                                                    temperature=0.0, timeout_s=120).text, PROMPTS))


def test_fp8_checkpoint_serves_the_dequantized_models_text(fp8_model, tmp_path):
    float_model = dequantized_copy(fp8_model, tmp_path / "float-model")
    quantized = served_texts(fp8_model, tmp_path / "fp8-logs")
    assert quantized == served_texts(float_model, tmp_path / "float-logs")
    assert all(text.strip() for text in quantized)
