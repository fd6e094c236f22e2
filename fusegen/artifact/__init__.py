"""Artifacts: a compiled model written to a directory, and loaded back without its Python.

    DIR/manifest.json        format and versions, model and compile config, passes with their
                             counters, kernels, weight index, and every other file's size and
                             SHA-256 (per 64 MiB chunk)
    DIR/graph.json           the optimized graph in fusegen's JSON IR (fusegen/ir.py)
    DIR/weights/NNNNN.safetensors   the tensors the graph reads (after any GQA conversion)
    DIR/kernels/<group>.py   the generated Triton source of every fused group
    DIR/tokenizer/           the tokenizer files, when one was given
    DIR/triton/<key>/        exported on CUDA: Triton's compiled binaries of the kernels
                             (binaries.py), used on the same GPU and Triton
    DIR/model.onnx(.data)    with ``onnx=True``: the graph for viewers (fusegen/onnx_view/)

Loading unpickles nothing: the manifest and graph are JSON, the weights safetensors, and the
graph's call targets resolve against allow-lists. The manifest is read and type-checked
first; every file it lists must be present and of its recorded size, and each file loading
reads must hash to the recorded digests (a kernel source, which is Python, is executed only
from the very bytes that matched). A failure raises an ``ArtifactError`` subclass naming the
file. The manifest is the root of trust: it detects damage and edits of the other files.
Kernel sources are generated again from the verified group graphs and must match the shipped
bytes, so no shipped Python runs unproven; the compiled binaries are trusted as far as the
manifest is (``load(..., triton_binaries=False)`` compiles the sources instead). Against a consistent rewrite of the manifest too,
sign at export (``sign_key``) and load with ``trusted_keys`` (``sign.py``).
"""

from fusegen.artifact.export import check_destination, export
from fusegen.artifact.format import FORMAT, FORMAT_VERSION, HASH_CHUNK, MANIFEST, chunk_digests
from fusegen.artifact.load import load
from fusegen.artifact.sign import SIGNATURE, generate_keys, sign
from fusegen.artifact.verify import read_manifest, verify_files

__all__ = ["export", "check_destination", "load", "sign", "generate_keys", "SIGNATURE", "read_manifest", "verify_files", "chunk_digests",
           "FORMAT", "FORMAT_VERSION", "HASH_CHUNK", "MANIFEST"]
