"""fusegen: an ahead-of-time graph compiler for decoder-only language models.

    import fusegen
    compiled = fusegen.compile(model)          # capture -> passes -> CompiledModel
    logits = compiled(input_ids)
"""

__version__ = "0.1.0"

from fusegen import ops  # noqa: F401  (registers the fusegen:: ops)
from fusegen.capture import capture
from fusegen.compiler import CompiledModel, CompileReport, compile
from fusegen.config import CompileConfig
from fusegen.errors import (ConfigError, FusegenError, GraphRefusedError, ModelNotFoundError, PassError,
                            UnsupportedModelError, VerificationError)


def load(directory, device=None, *, trusted_keys=None, progress: bool = False, triton_binaries: bool = True,
         runtime: str | None = None) -> CompiledModel:
    """Load an artifact written by ``fusegen-cli export`` or ``CompiledModel.save`` (see
    fusegen.artifact): checked against its manifest, no pickle, no model code; with
    ``trusted_keys`` (Ed25519 public keys), its signature must verify with one of them.
    ``triton_binaries``: use the compiled kernels it ships on a matching GPU; ``runtime``:
    engine fields of the config to change (``"lazy_cuda_graphs=1"``)."""
    from fusegen.artifact import load as _load

    return _load(directory, device, trusted_keys=trusted_keys, progress=progress,
                 triton_binaries=triton_binaries, runtime=runtime)


def load_model(name_or_path, **kwargs):
    """Load a local HF model directory or the bundled default model (see fusegen.models)."""
    from fusegen.models import load_model as _load

    return _load(name_or_path, **kwargs)


__all__ = [
    "__version__", "capture", "compile", "load", "load_model", "CompiledModel", "CompileReport",
    "CompileConfig", "FusegenError", "UnsupportedModelError", "ModelNotFoundError",
    "ConfigError", "PassError", "GraphRefusedError", "VerificationError",
]
