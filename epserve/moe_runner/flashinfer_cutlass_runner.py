"""``flashinfer_cutlass``: FlashInfer's CUTLASS fused MoE, with SGLang's guardrails.

Its kernels take modelopt_fp4 (or FP8) expert weights; epserve serves bf16/fp16 experts,
so this backend only checks the configuration the way SGLang does and then says what is
missing. The checks raise ``ValueError`` (bad flags), ``ImportError`` (no flashinfer),
``NotImplementedError`` (flags fine, library present, weights not FP4/FP8 here).
"""

from __future__ import annotations

from epserve.moe_runner.base import MoERunnerConfig

FP4 = "modelopt_fp4"
FP8 = ("fp8", "modelopt_fp8", "modelopt")


def check_flashinfer_cutlass_config(config: MoERunnerConfig) -> None:
    """SGLang's server-args guardrails for --moe-runner-backend flashinfer_cutlass."""
    if config.quantization == FP4:
        if config.ep_size not in (1, config.tp_size):
            raise ValueError(f"--moe-runner-backend flashinfer_cutlass needs --ep-size 1 or equal to "
                             f"--tp-size ({config.tp_size}); got --ep-size {config.ep_size}")
        return
    if config.quantization in FP8:
        if config.ep_size != 1:
            raise ValueError(f"--moe-runner-backend flashinfer_cutlass with FP8 ({config.quantization}) "
                             f"needs --ep-size 1; got --ep-size {config.ep_size}")
        return
    raise ValueError(f"--moe-runner-backend flashinfer_cutlass needs --quantization {FP4} "
                     f"(got {config.quantization!r})")


def make_flashinfer_cutlass_runner(config: MoERunnerConfig):
    check_flashinfer_cutlass_config(config)
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        raise ImportError("--moe-runner-backend flashinfer_cutlass needs the `flashinfer` library "
                          "(pip install flashinfer-python)") from e
    raise NotImplementedError("flashinfer_cutlass runs FP4/FP8 expert weights; epserve's expert "
                              "workers hold bf16/fp16 weights, which this backend does not take")

