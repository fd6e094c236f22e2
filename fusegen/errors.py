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


class GraphRefusedError(PassError, UnsupportedModelError):
    """A pass cannot rewrite this model's graph as the config asks. Names the model class,
    the module path of the node it refused, and a compile config that works for the model.
    It is both a PassError (which pass) and an UnsupportedModelError (which model)."""

    def __init__(self, pass_name: str, model_class: str, where: str, reason: str, works: str):
        self.pass_name = pass_name
        self.model_class = model_class
        self.where = where
        self.reason = reason
        self.works = works
        FusegenError.__init__(self, f"[{pass_name}] {model_class}: {reason} (at {where}); "
                                    f"compile with {works} instead")


class VerificationError(PassError):
    """A graph broke an invariant after a pass (lint, or a pass-declared property)."""


class ArtifactError(FusegenError):
    """An exported artifact cannot be loaded. ``path`` names the file (relative to the
    artifact directory where it is one of its files), ``problem`` what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ArtifactMissingError(ArtifactError, FileNotFoundError):
    """The artifact directory, its manifest, or a file the manifest lists is not there."""


class ArtifactTruncatedError(ArtifactError):
    """A file is shorter than the manifest records (an interrupted copy or download)."""


class ArtifactTamperedError(ArtifactError):
    """A file's content does not hash to what the manifest records."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by an incompatible fusegen, torch or artifact format."""


class ArtifactUntrustedError(ArtifactError):
    """Trusted keys were given and the artifact's signature is missing or verifies with none."""


class ArtifactFormatError(ArtifactError):
    """A file parses but is not what fusegen writes (malformed JSON, unknown op, bad field)."""


class MissingDependencyError(FusegenError, ImportError):
    """An optional package a feature needs is not installed."""


class RequestFailedError(FusegenError, RuntimeError):
    """An accepted request could not be completed because the step computing it raised.
    The request was aborted and its blocks returned; the engine goes on serving the rest."""

    def __init__(self, request_id: int, cause: BaseException):
        self.request_id = request_id
        self.cause = cause
        super().__init__(f"request {request_id} failed in an engine step: "
                         f"{type(cause).__name__}: {cause}")


class RequestAbortedError(FusegenError, RuntimeError):
    """The request was aborted (``Engine.abort``) while a consumer was waiting for its tokens."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        super().__init__(f"request {request_id} was aborted")
