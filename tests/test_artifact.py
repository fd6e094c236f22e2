"""Artifacts: export -> load round trips, and every way a damaged artifact is refused."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusegen
from fusegen import artifact
from fusegen.errors import (ArtifactError, ArtifactFormatError, ArtifactMissingError, ArtifactTamperedError, ArtifactUntrustedError,
                            ArtifactTruncatedError, ArtifactVersionError)
from fusegen.fused_group import FusedGroup
from families import left_padded, mini_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    return fusegen.compile(mini_model("llama"))


@pytest.fixture
def saved(llama, tmp_path):
    return llama.save(tmp_path / "artifact")


def _rehash(directory: Path, rel: str) -> None:
    """Update the manifest's record of ``rel`` after an edit (a consistent tamper)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "sha256": artifact.chunk_digests(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _set(path, value):
    """A manifest edit setting the field at ``path`` (a list of keys) to ``value``."""
    def edit(manifest):
        *parents, key = path
        target = manifest
        for p in parents:
            target = target[p]
        target[key] = value
    return edit


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("family,config", [("llama", None), ("gpt2", None), ("mistral", None),
                                           ("qwen2", "preset=dense_kv"), ("llama", "preset=stateless")])
def test_loaded_model_matches_the_compiled_one(family, config, tmp_path):
    compiled = fusegen.compile(mini_model(family), config)
    loaded = fusegen.load(compiled.save(tmp_path / "a"))
    ids, mask = left_padded([12, 3, 7], 12, seed=1)
    torch.testing.assert_close(loaded(ids, mask), compiled(ids, mask), rtol=0, atol=0)
    if compiled.kind != "stateless":
        assert torch.equal(loaded.generate(ids, 16, attention_mask=mask),
                           compiled.generate(ids, 16, attention_mask=mask))
    assert loaded.kind == compiled.kind and loaded.config == compiled.config
    assert loaded.facts["kv" if compiled.kind != "stateless" else "vocab_size"] == \
        compiled.facts["kv" if compiled.kind != "stateless" else "vocab_size"]


def test_engine_of_a_loaded_model_gives_the_same_tokens(llama, saved):
    loaded = fusegen.load(saved)
    prompts = [[5, 9, 3, 77, 12], [8], [100, 4, 4, 4, 60, 2, 31, 9]]
    assert loaded.generate_batch(prompts, 12) == llama.generate_batch(prompts, 12)


def test_loaded_graph_has_the_kernels_and_the_report(llama, saved):
    loaded = fusegen.load(saved)
    groups = {n: m for n, m in loaded.graph_module.named_children() if isinstance(m, FusedGroup)}
    originals = {n: m for n, m in llama.graph_module.named_children() if isinstance(m, FusedGroup)}
    assert groups.keys() == originals.keys() and groups
    for name, group in groups.items():
        assert group.source == originals[name].source
        assert group.kernel is None      # on the CPU no kernel launches, so none is imported
    assert [r.name for r in loaded.report.records] == [r.name for r in llama.report.records]
    assert loaded.report.counters == llama.report.counters
    assert [str(n.target) for n in loaded.graph_module.graph.nodes] == \
        [str(n.target) for n in llama.graph_module.graph.nodes]


@pytest.mark.skipif(torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET"),
                    reason="runs generated kernels on CPU tensors: needs TRITON_INTERPRET=1")
def test_loaded_kernels_run_like_the_references(saved, monkeypatch):
    monkeypatch.setenv("FUSEGEN_KERNELS", "1")  # the generated Triton kernels, interpreted on CPU
    loaded = fusegen.load(saved)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with_kernels = loaded(ids)
    monkeypatch.setenv("FUSEGEN_KERNELS", "0")
    torch.testing.assert_close(with_kernels, loaded(ids), rtol=1e-5, atol=1e-5)


def test_gqa_converted_weights_are_what_is_stored(tmp_path):
    calibration = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    compiled = fusegen.compile(mini_model("llama"), "gqa_kv_heads=1", calibration_ids=calibration)
    loaded = fusegen.load(compiled.save(tmp_path / "gqa"))
    assert loaded.facts["kv"].kv_heads == 1
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.generate(ids, 10), compiled.generate(ids, 10))


def test_a_tensor_named_twice_is_stored_once(tmp_path):
    """Aliases (one tensor under two names) are written once and come back as one tensor;
    a view of the same storage is stored as its own copy."""
    from fusegen.artifact.export import _write_weights
    from fusegen.artifact.weights import read_weights

    base = torch.randn(4, 8)
    tensors = {"a": base, "b": base, "c": base[1:], "d": torch.randn(3)}
    index = _write_weights(tensors, tmp_path, progress=False)
    assert index["aliases"] == {"b": "a"} and set(index["tensors"]) == {"a", "c", "d"}
    assert index["bytes"] == (32 + 24 + 3) * 4
    back = read_weights(tmp_path, index, {}, torch.device("cpu"), streamed=False)
    assert back["b"] is back["a"] and back["c"].data_ptr() != back["a"].data_ptr()
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name


def test_manifest_records_what_the_issue_lists(llama, saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format"] == "fusegen-artifact" and manifest["format_version"] == 2
    assert set(manifest["versions"]) == {"fusegen", "torch", "triton"}
    assert manifest["model"]["class"] == "LlamaForCausalLM"
    assert manifest["model"]["config"]["hidden_size"] == 64
    assert manifest["compile_config"] == llama.config.to_string()
    assert [p["name"] for p in manifest["passes"]] == [r.name for r in llama.report.records]
    assert manifest["passes"][-1]["counters"] == dict(llama.report.records[-1].stats)
    for kernel in manifest["kernels"]:
        assert kernel["file"] in manifest["files"] and kernel["source_hash"]
    for rel, entry in manifest["files"].items():
        assert (saved / rel).stat().st_size == entry["bytes"]


def test_export_refuses_a_directory_with_other_files(llama, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        llama.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_replaces_an_older_artifact(llama, saved):
    (saved / "weights" / "stray.bin").write_bytes(b"x")
    llama.save(saved)
    assert not (saved / "weights" / "stray.bin").exists()
    fusegen.load(saved)


def test_export_refuses_another_tools_manifest(llama, tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "a web app"}')
    (tmp_path / "app.js").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no fusegen artifact"):
        llama.save(tmp_path)
    assert (tmp_path / "app.js").read_text() == "keep"


def test_export_to_the_current_directory(llama, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    llama.save(".")
    assert fusegen.load(".").kind == "paged"


def test_a_loaded_model_saves_the_same_graph(saved, tmp_path):
    again = fusegen.load(saved).save(tmp_path / "again")
    assert json.loads((again / "graph.json").read_text()) == json.loads((saved / "graph.json").read_text())
    fusegen.load(again)


def test_a_loaded_model_is_analysed_and_viewed_like_the_compiled_one(llama, saved, tmp_path):
    """The loaded graph carries the compiled graph's symbolic shapes (artifact/shapes.py):
    the cost model and the ONNX view take it."""
    from fusegen.analysis import analyze

    loaded = fusegen.load(saved)
    assert str(analyze(loaded, 8, 128)) == str(analyze(llama, 8, 128))
    assert (loaded.save(tmp_path / "with-onnx", onnx=True) / "model.onnx").is_file()


# --- damaged artifacts ----------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactMissingError, match="no such artifact directory"):
        fusegen.load(tmp_path / "nothing")


def test_missing_manifest(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactMissingError, match="manifest.json"):
        fusegen.load(saved)


def test_truncated_manifest(saved):
    text = (saved / "manifest.json").read_text()
    (saved / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactFormatError, match="manifest.json: not valid JSON"):
        fusegen.load(saved)


def test_truncated_weights(saved):
    path = saved / "weights" / "00000.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ArtifactTruncatedError, match="weights/00000.safetensors: truncated"):
        fusegen.load(saved)


def test_one_flipped_weight_byte(saved):
    path = saved / "weights" / "00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-17] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactTamperedError, match="weights/00000.safetensors: content differs"):
        fusegen.load(saved)


def test_edited_graph(saved):
    path = saved / "graph.json"
    path.write_text(path.read_text().replace("aten::mul.Tensor", "aten::add.Tensor", 1))
    with pytest.raises(ArtifactTamperedError, match="graph.json"):
        fusegen.load(saved)


def test_missing_listed_file(saved):
    (saved / "kernels" / "fused_0.py").unlink()
    with pytest.raises(ArtifactMissingError, match="kernels/fused_0.py"):
        fusegen.load(saved)


def test_tampered_kernel_is_refused_and_never_executed(saved, tmp_path):
    marker = tmp_path / "ran"
    path = saved / "kernels" / "fused_0.py"
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + path.read_text())
    with pytest.raises(ArtifactTamperedError, match="kernels/fused_0.py"):
        fusegen.load(saved)
    assert not marker.exists()


@pytest.mark.parametrize("field,value,problem", [
    ("format_version", 1, "format version 1"),
    ("versions.torch", "1.13.0", "torch 1.13.0"),
    ("versions.fusegen", "9.0.0", "fusegen 9.0.0"),
])
def test_version_mismatch(saved, field, value, problem):
    _edit_manifest(saved, _set(field.split("."), value))
    with pytest.raises(ArtifactVersionError, match=problem):
        fusegen.load(saved)


def test_not_an_artifact(saved):
    _edit_manifest(saved, lambda m: m.update(format="something-else"))
    with pytest.raises(ArtifactFormatError, match="format 'something-else'"):
        fusegen.load(saved)


@pytest.mark.parametrize("target", [{"fn": "builtins.eval"}, {"fn": "os.system"},
                                    {"op": "os::system.default"}, {"op": "aten::no_such_op.default"},
                                    {"op": "aten::from_file.default"}, {"op": "aten::save.default"}])
def test_graph_may_only_name_allowed_targets(saved, target):
    """Even with the manifest hash updated to match, the IR cannot reach arbitrary callables."""
    graph = json.loads((saved / "graph.json").read_text())
    node = next(n for n in graph["nodes"] if n["op"] == "call_function")
    node["target"] = target
    (saved / "graph.json").write_text(json.dumps(graph))
    _rehash(saved, "graph.json")
    with pytest.raises(ArtifactFormatError, match=f"graph.json: node {node['name']!r}"):
        fusegen.load(saved)


def test_manifest_cannot_point_outside_the_artifact(saved, tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("secret")

    def edit(manifest):
        manifest["files"]["../elsewhere.txt"] = {"bytes": 6, "sha256": artifact.chunk_digests(b"secret")}
    _edit_manifest(saved, edit)
    with pytest.raises(ArtifactFormatError, match="points outside the artifact"):
        fusegen.load(saved)


def test_graph_with_a_dangling_reference(saved):
    graph = json.loads((saved / "graph.json").read_text())
    graph["nodes"] = [n for n in graph["nodes"] if n["name"] != "embedding"]
    (saved / "graph.json").write_text(json.dumps(graph))
    _rehash(saved, "graph.json")
    with pytest.raises(ArtifactFormatError, match="before it is defined"):
        fusegen.load(saved)


def test_graph_without_an_output(saved):
    graph = json.loads((saved / "graph.json").read_text())
    graph["nodes"] = [n for n in graph["nodes"] if n["op"] != "output"]
    (saved / "graph.json").write_text(json.dumps(graph))
    _rehash(saved, "graph.json")
    with pytest.raises(ArtifactFormatError, match="exactly one output"):
        fusegen.load(saved)


def test_kernel_rewritten_with_its_hash_is_refused_and_never_executed(saved, tmp_path):
    """A consistent rewrite (file and manifest hash) no longer passes: the kernel is
    generated again from its group's graph and must be the same bytes."""
    marker = tmp_path / "ran"
    path = saved / "kernels" / "fused_0.py"
    path.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + path.read_text())
    _rehash(saved, "kernels/fused_0.py")
    with pytest.raises(ArtifactTamperedError, match="kernels/fused_0.py: differs from the kernel that "
                                                    "group 'fused_0' of the graph generates"):
        fusegen.load(saved)
    assert not marker.exists()
    (saved / "kernels" / "fused_0.py").write_bytes(b"def broken(:\n")
    _rehash(saved, "kernels/fused_0.py")
    with pytest.raises(ArtifactTamperedError, match="kernels/fused_0.py"):
        fusegen.load(saved)


def test_kernel_source_hash_in_the_manifest_is_compared(saved):
    _edit_manifest(saved, lambda m: m["kernels"][0].update(source_hash="0" * 16))
    with pytest.raises(ArtifactTamperedError, match="kernel 'fused_0': source_hash '0000000000000000' is "
                                                    "not the hash of its source"):
        fusegen.load(saved)


def test_no_stored_code_is_imported_on_a_device_that_launches_none(saved, monkeypatch):
    imported = []
    monkeypatch.setattr("fusegen.codegen.cache.load", lambda source: imported.append(source))
    monkeypatch.delenv("FUSEGEN_KERNELS", raising=False)
    loaded = fusegen.load(saved)
    assert imported == [] and all(m.source for m in loaded.graph_module.children() if isinstance(m, FusedGroup))


MALFORMED = {
    "file entry": _set(["files", "graph.json"], "abc"),
    "empty digests": lambda m: m["files"]["graph.json"].update(sha256=[]),
    "graph not listed": lambda m: m["files"].pop("graph.json"),
    "kernel entry": lambda m: m["kernels"].__setitem__(0, "fused_0"),
    "kernel without file": lambda m: m["kernels"][0].pop("file"),
    "kernel file list": lambda m: m["kernels"][0].update(file=["x"]),
    "model class": lambda m: m["model"].pop("class"),
    "pass record": lambda m: m["passes"].__setitem__(0, {}),
    "shard not listed": lambda m: m["files"].pop("weights/00000.safetensors"),
    "alias of a list": lambda m: m["weights"]["aliases"].update(x=["y"]),
    "compile config": lambda m: m.update(compile_config="no_such_field=1"),
    "device": lambda m: m.update(device="banana"),
    "tokenizer outside": lambda m: m.update(tokenizer="/tmp"),
    "tokenizer type": lambda m: m.update(tokenizer=5),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_names_the_manifest(saved, case):
    _edit_manifest(saved, MALFORMED[case])
    with pytest.raises(ArtifactFormatError, match="^manifest.json: "):
        fusegen.load(saved)


# --- no pickle on the loading path ---------------------------------------------------------------

LOADING_MODULES = ["fusegen/artifact/load.py", "fusegen/artifact/verify.py", "fusegen/artifact/format.py",
                   "fusegen/artifact/weights.py", "fusegen/artifact/binaries.py", "codegen/triton_cache.py",
                   "fusegen/ir.py"]


def test_loading_modules_import_no_pickle():
    """The modules that read an artifact import no pickle-family module and call no
    torch.load, eval or exec (kernel sources are imported by codegen/cache.py, after their
    hash matched)."""
    for rel in LOADING_MODULES:
        tree = ast.parse((REPO / rel).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Attribute) and node.attr == "load" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                raise AssertionError(f"{rel} calls torch.load")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                raise AssertionError(f"{rel} calls {node.func.id}")
        assert not imported & {"pickle", "_pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}, rel


def test_load_and_generate_with_unpickling_disabled(saved):
    """In a fresh interpreter where every unpickling entry point raises, an artifact still
    loads and generates."""
    script = f"""
import sys, pickle, _pickle, torch
def refuse(*a, **k):
    raise RuntimeError("unpickling attempted")
for module in (pickle, _pickle):
    module.load = module.loads = refuse
    module.Unpickler = type("RefusingUnpickler", (module.Unpickler,), {{"__init__": refuse}})
torch.load = refuse
def audit(event, args):
    if event == "pickle.find_class":
        raise RuntimeError("unpickling attempted: " + repr(args))
sys.addaudithook(audit)
import fusegen
model = fusegen.load({str(saved)!r})
out = model.generate(torch.tensor([[5, 9, 3, 77]]), 6)
print("ok", out.shape[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "10"]


# --- what loading proves beyond the hashes ---------------------------------------------------

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    vocab["[UNK]"] = 100
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def with_tokenizer(llama, tmp_path):
    return llama.save(tmp_path / "artifact", tokenizer=_tiny_tokenizer())


def test_the_tokenizer_folder_holds_only_listed_files(with_tokenizer, tmp_path):
    loaded = fusegen.load(with_tokenizer)
    assert loaded.tokenizer("w1 w7").input_ids == [1, 7]
    extra = with_tokenizer / "tokenizer" / "added_tokens.json"
    extra.write_text('{"w1": 99}')
    with pytest.raises(ArtifactTamperedError, match="tokenizer/added_tokens.json: is not listed in the manifest"):
        fusegen.load(with_tokenizer)
    extra.unlink()
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0")
    (with_tokenizer / "tokenizer" / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(ArtifactTamperedError, match="chat_template.jinja: is a symbolic link"):
        fusegen.load(with_tokenizer)


def test_the_tokenizer_is_loaded_without_remote_code(with_tokenizer, monkeypatch):
    seen = {}
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    assert fusegen.load(with_tokenizer).tokenizer is not None
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


@pytest.mark.parametrize("edit, problem", [
    (lambda f: f["dict"]["kv"]["dict"].update(block_size=0), "facts.kv.block_size 0 differs"),
    (lambda f: f["dict"]["kv"]["dict"].update(block_size=-4), "facts.kv is not a KV geometry .*block_size"),
    (lambda f: f["dict"]["kv"]["dict"].update(kv_heads=3), "facts.kv is not a KV geometry .*not a multiple"),
    (lambda f: f["dict"]["kv"]["dict"].update(block_size=32), "facts.kv.block_size 32 differs"),
    (lambda f: f["dict"].update(vocab_size=-1), "facts.vocab_size = -1 is out of range"),
    (lambda f: f["dict"].update(eos_token_id="2"), "facts.eos_token_id = '2'"),
])
def test_facts_are_checked_by_type_and_range(saved, edit, problem):
    _edit_manifest(saved, lambda m: edit(m["facts"]))
    with pytest.raises(ArtifactFormatError, match=problem):
        fusegen.load(saved)


@pytest.mark.parametrize("change, problem", [
    (lambda t: t[:-1], r"is float32 \[127, 64\], the graph reads float32 \[128, 64\]"),
    (lambda t: t.double(), r"is float64 \[128, 64\], the graph reads float32"),
])
def test_weights_must_have_the_shape_and_dtype_the_graph_reads(saved, change, problem):
    from safetensors.torch import load_file, save_file

    path = saved / "weights" / "00000.safetensors"
    tensors = load_file(path)
    name = "fusegen_fused_proj_0_weight"           # q, k, v of layer 0: [64 + 32 + 32, 64]
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, path)
    _rehash(saved, "weights/00000.safetensors")
    with pytest.raises(ArtifactFormatError, match=f"graph.json: tensor '{name}' {problem}"):
        fusegen.load(saved)


# --- signed artifacts ----------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    artifact.generate_keys(tmp_path / "key.pem", tmp_path / "key.pub.pem")
    artifact.generate_keys(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    return tmp_path


def test_a_signed_artifact_loads_with_its_key_and_a_consistent_rewrite_no_longer_passes(llama, keys, tmp_path):
    signed = llama.save(tmp_path / "signed", sign_key=keys / "key.pem")
    assert (signed / artifact.SIGNATURE).is_file()
    loaded = fusegen.load(signed, trusted_keys=[keys / "other.pub.pem", keys / "key.pub.pem"])
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(ids), llama(ids), rtol=0, atol=0)
    with pytest.raises(ArtifactUntrustedError, match="manifest.sig: does not verify with any of the 1"):
        fusegen.load(signed, trusted_keys=[keys / "other.pub.pem"])
    # Rewrite the graph and its record in the manifest consistently: hashes pass, the signature does not.
    path = signed / "graph.json"
    path.write_text(path.read_text().replace("aten::mul.Tensor", "aten::add.Tensor", 1))
    _rehash(signed, "graph.json")
    with pytest.raises(ArtifactUntrustedError, match="does not verify"):
        fusegen.load(signed, trusted_keys=[keys / "key.pub.pem"])


def test_trusted_keys_refuse_an_unsigned_artifact(saved, keys):
    fusegen.load(saved)                                   # no keys asked for: loads
    with pytest.raises(ArtifactUntrustedError, match="manifest.sig: missing: the artifact is not signed"):
        fusegen.load(saved, trusted_keys=[keys / "key.pub.pem"])
    (saved / artifact.SIGNATURE).write_text("not base64!\n")
    with pytest.raises(ArtifactUntrustedError, match="not a base64 signature"):
        fusegen.load(saved, trusted_keys=[keys / "key.pub.pem"])
    with pytest.raises(ValueError, match="not a PEM public key"):
        fusegen.load(saved, trusted_keys=[keys / "key.pem"])


def test_cli_export_sign_and_run_trusted_key(tiny_llama_dir_for_artifacts, keys, tmp_path, capsys):
    from fusegen.cli import main

    out = tmp_path / "art"
    assert main(["export", str(tiny_llama_dir_for_artifacts), "-o", str(out), "--sign", str(keys / "key.pem")]) == 0
    assert (out / artifact.SIGNATURE).is_file()
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "w1 w2", "--max-new-tokens", "2",
                 "--trusted-key", str(keys / "other.pub.pem")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.sig: does not verify" in err[0]
    assert main(["export", str(tiny_llama_dir_for_artifacts), "-o", str(tmp_path / "b"), "--sign",
                 str(keys / "key.pub.pem")]) == 2
    assert "not a PEM private key" in capsys.readouterr().err


@pytest.fixture
def tiny_llama_dir_for_artifacts(tmp_path):
    path = tmp_path / "tiny"
    mini_model("llama").save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


# --- fuzzing the manifest and graph.json ---------------------------------------------------

def _paths(value, prefix=()):
    """Every (container path, key) in a JSON document."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=False),
                                     st.text(max_size=8), st.sampled_from(["aten::add.Tensor", "graph.json", "../x"])),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return fusegen.compile(mini_model("llama")).save(tmp_path_factory.mktemp("fuzz") / "artifact")


@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 50)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), which=st.sampled_from(["manifest.json", "graph.json"]))
def test_fuzz_edits_of_the_manifest_and_graph_give_a_typed_error_or_a_model(pristine, tmp_path_factory, data, which):
    import shutil
    import signal

    directory = tmp_path_factory.mktemp("case") / "artifact"
    shutil.copytree(pristine, directory)
    doc = json.loads((directory / which).read_text())
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    (directory / which).write_text(json.dumps(doc))
    if which == "graph.json":
        _rehash(directory, "graph.json")                  # so that the edit reaches the parser

    def hang(*_):
        raise TimeoutError(f"load hung after editing {which} at {path}")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        loaded = fusegen.load(directory)
    except ArtifactError:
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert loaded.graph_module is not None


@pytest.mark.parametrize("edit", ["kwarg", "placeholder", "get_attr"])
def test_names_fx_would_write_into_python_source_must_be_identifiers(saved, tmp_path, edit):
    """fx generates the graph's forward as Python source: a crafted name must never reach it."""
    marker = tmp_path / "ran"
    payload = f"x=open({str(marker)!r}, 'w')"
    graph = json.loads((saved / "graph.json").read_text())
    if edit == "kwarg":
        node = next(n for n in graph["nodes"] if n["op"] == "call_function")
        node["kwargs"] = {"dict": {payload: 1}}
    else:
        node = next(n for n in graph["nodes"] if n["op"] == edit)
        node["target"] = payload
    (saved / "graph.json").write_text(json.dumps(graph))
    _rehash(saved, "graph.json")
    with pytest.raises(ArtifactFormatError, match=f"graph.json: node {node['name']!r}"):
        fusegen.load(saved)
    assert not marker.exists()


def test_load_through_a_relative_path_or_a_link_with_a_tokenizer(with_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(with_tokenizer.parent)
    assert fusegen.load(with_tokenizer.name).tokenizer is not None
    (tmp_path / "link").symlink_to(with_tokenizer)
    assert fusegen.load(tmp_path / "link").tokenizer is not None


def test_the_tokenizer_is_read_at_load_not_at_first_use(with_tokenizer):
    loaded = fusegen.load(with_tokenizer)
    (with_tokenizer / "tokenizer" / "tokenizer.json").write_text("{}")   # after the checks
    assert loaded.tokenizer("w1 w7").input_ids == [1, 7]


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.update(kind="dense"), "kind 'dense', but the graph is paged"),
    (lambda m: m["facts"]["dict"].pop("kv"), "facts.kv.block_size None differs"),
    (lambda m: m["facts"]["dict"]["kv"]["dict"].update(layers=1), "does not match the graph's kv_pool"),
    (lambda m: m["facts"]["dict"]["kv"]["dict"].update(dtype={"dtype": "bfloat16"}),
     "does not match the graph's kv_pool"),
])
def test_the_manifest_must_agree_with_the_graph(saved, edit, problem):
    _edit_manifest(saved, edit)
    with pytest.raises(ArtifactFormatError, match=problem):
        fusegen.load(saved)


def test_one_trusted_key_may_be_given_on_its_own(llama, keys, tmp_path):
    signed = llama.save(tmp_path / "signed", sign_key=keys / "key.pem")
    for key in (str(keys / "key.pub.pem"), keys / "key.pub.pem", (keys / "key.pub.pem").read_bytes()):
        assert fusegen.load(signed, trusted_keys=key) is not None
