"""`model.dtype`: a named dtype, or `auto`, the checkpoint's own dtype where the device computes in it
natively (bfloat16 on CPUs with AVX512-BF16 or AMX and on GPUs that have it, float16 on GPUs), else
float32, as vLLM chooses. float32 is the exact mode: tests that compare with transformers run in it."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_runs_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def checkpoint_dtype(hf_config) -> torch.dtype | None:
    found = getattr(hf_config, "dtype", None)  # (transformers reads an older config's `torch_dtype` into it)
    if isinstance(found, str):
        found = DTYPES.get(found.removeprefix("torch."))
    return found if found in DTYPES.values() else None


def choose_dtype(name: str, device: torch.device, hf_config) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the startup log)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name], f"model.dtype={name}"
    saved = checkpoint_dtype(hf_config)
    # a checkpoint naming no dtype (a quantised GGUF: integers and scales) is served in bfloat16
    wanted, origin = (saved, f"the checkpoint's {_name(saved)}") if saved else (torch.bfloat16, "no dtype in the checkpoint")
    if wanted == torch.float32:
        return torch.float32, f"model.dtype=auto: {origin}"
    if device.type == "cuda":
        if wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16, f"model.dtype=auto: {origin}, but this GPU lacks bfloat16"
        return wanted, f"model.dtype=auto: {origin}, native on this GPU"
    if device.type == "cpu" and cpu_runs_bf16():
        # float16 is no native CPU dtype; bfloat16 keeps its range at half its cost
        return torch.bfloat16, f"model.dtype=auto: {origin}; this CPU runs bfloat16 natively (AVX512-BF16/AMX)"
    return torch.float32, f"model.dtype=auto: {origin}, but {device.type} lacks native {_name(wanted)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
