"""Signed artifacts: an Ed25519 signature of ``manifest.json`` in ``manifest.sig``.

The manifest records the size and SHA-256 of every other file, so a signature over its
bytes covers the whole artifact: with ``trusted_keys`` given, ``load`` refuses an artifact
whose signature is missing or made by another key, and a consistent rewrite of the
manifest and its files no longer passes. Keys are PEM files, e.g. made with

    openssl genpkey -algorithm ed25519 -out signing.pem
    openssl pkey -in signing.pem -pubout -out signing.pub.pem

(or ``generate_keys``). Needs the ``cryptography`` package (``pip install 'fusegen[sign]'``).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from fusegen.artifact.format import MANIFEST
from fusegen.errors import ArtifactUntrustedError, MissingDependencyError

SIGNATURE = "manifest.sig"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingDependencyError("signing artifacts needs the cryptography package: "
                                     "pip install 'fusegen[sign]'") from None
    return serialization, ed25519, InvalidSignature


def generate_keys(private_path, public_path) -> None:
    """Write a new Ed25519 key pair as PEM files."""
    serialization, ed25519, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    Path(private_path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))


def read_key(source, private: bool):
    serialization, ed25519, _ = _crypto()
    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if isinstance(source, kind):
        return source
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source if not isinstance(source, bytes) else 'key'}: not a PEM "
                         f"{'private' if private else 'public'} key ({e})") from None
    if not isinstance(key, kind):
        raise ValueError(f"{source if not isinstance(source, bytes) else 'key'}: not an Ed25519 key")
    return key


def sign(directory: Path, private_key) -> None:
    """Write ``manifest.sig``: the signature of the manifest's bytes."""
    key = read_key(private_key, private=True)
    signature = key.sign((Path(directory) / MANIFEST).read_bytes())
    (Path(directory) / SIGNATURE).write_bytes(base64.b64encode(signature) + b"\n")


def check_signature(directory: Path, manifest: bytes, trusted_keys) -> None:
    """Raise ``ArtifactUntrustedError`` unless one of ``trusted_keys`` signed ``manifest``."""
    _, ed25519, invalid = _crypto()
    if isinstance(trusted_keys, (str, bytes, os.PathLike, ed25519.Ed25519PublicKey)):
        trusted_keys = [trusted_keys]     # one key given on its own
    keys = [read_key(k, private=False) for k in trusted_keys]
    if not keys:
        raise ValueError("trusted_keys is empty: give at least one public key")
    path = Path(directory) / SIGNATURE
    if not path.is_file() or path.is_symlink():
        raise ArtifactUntrustedError(SIGNATURE, "missing: the artifact is not signed, and trusted keys were given")
    try:
        signature = base64.b64decode(path.read_bytes().strip(), validate=True)
    except ValueError:
        raise ArtifactUntrustedError(SIGNATURE, "not a base64 signature") from None
    for key in keys:
        try:
            key.verify(signature, manifest)
            return
        except invalid:
            continue
    raise ArtifactUntrustedError(SIGNATURE, f"does not verify with any of the {len(keys)} trusted key(s): "
                                 f"the manifest was changed or signed by someone else")
