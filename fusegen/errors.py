"""Typed errors. Each names what the user can act on: the model class, the module path,
the op, the shapes, the file."""


class FusegenError(Exception):
    """Base class of every error fusegen raises on purpose."""


class UnsupportedModelError(FusegenError):
    """The model cannot be captured or compiled.

    ``model_class`` is the class name of the user's model; ``where`` names the module path
    or op that failed."""

    def __init__(self, model_class: str, where: str, reason: str):
        self.model_class = model_class
        self.where = where
        self.reason = reason
        super().__init__(f"{model_class} is not supported: {reason} (at {where})")


class ModelNotFoundError(FusegenError, FileNotFoundError):
    """A model name or directory that does not resolve to loadable weights."""


class ConfigError(FusegenError, ValueError):
    """A CompileConfig that cannot be parsed or built."""


class PassError(FusegenError):
    """A pass failed, or refused a site it could not prove equivalent under ``strict``."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"[{pass_name}] {message}")


class VerificationError(PassError):
    """A graph broke an invariant after a pass (lint, or a pass-declared property)."""
