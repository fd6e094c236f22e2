"""Cold start of a loaded artifact: Triton's binaries shipped and seeded into Triton's cache,
the weights streamed and hashed in parallel, CUDA graphs captured per bucket on first use.

CPU tests stand in fake binaries for the ones a GPU export collects; the GPU test at the end
exports on CUDA and loads in a fresh process with an empty Triton cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusegen
from fusegen.artifact import format as artifact_format, weights as artifact_weights
from fusegen.codegen import launch, prefill_tuning, skinny_gemm, triton_cache
from fusegen.config import CompileConfig
from fusegen.errors import ArtifactFormatError, ArtifactTamperedError, ConfigError
from fusegen.runtime.cuda_graphs import StepGraphs
from families import mini_model

KEY = triton_cache.TargetKey("3.6.0", "NVIDIA H200", (9, 0))
GENERATED = "fusegen_kernel_" + "a" * 16 + ":_fused_" + "a" * 16 + "_kernel"
FAKE = [triton_cache.Binary("DIRONE", "_fused_kernel", "cubin", GENERATED, "src1",
                            b'{"name": "_fused_kernel"}', b"\x7fELF cubin one"),
        triton_cache.Binary("DIRTWO", "_gone_kernel", "cubin", "fusegen.codegen.no_such_module:_gone_kernel",
                            "src2", b'{"name": "_gone_kernel"}', b"\x7fELF cubin two")]


@pytest.fixture(scope="module")
def llama():
    compiled = fusegen.compile(mini_model("llama"))
    compiled._shared_engine = object()   # binaries.write sets the engine up first: not needed here
    return compiled


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """As if this CPU were the H200 the fake binaries were compiled on, with an empty
    Triton cache directory (returned)."""
    monkeypatch.setattr(triton_cache.TargetKey, "of", classmethod(lambda cls, device: KEY))
    monkeypatch.setattr(triton_cache, "compiled_binaries", lambda device: FAKE)
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def shipped(llama, on_gpu, tmp_path):
    return llama.save(tmp_path / "artifact")


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


# --- Triton binaries --------------------------------------------------------------------------

def test_binaries_are_listed_and_hashed_like_every_file(shipped):
    manifest = _manifest(shipped)
    record = manifest["triton_binaries"]
    assert record["target"] == {"triton": "3.6.0", "gpu": "NVIDIA H200", "capability": [9, 0]}
    assert [(e["dir"], e["name"], e["function"]) for e in record["entries"]] == \
        [(b.dir, b.name, b.function) for b in FAKE]
    for entry, fake in zip(record["entries"], FAKE):
        for rel, data in ((entry["metadata"], fake.metadata), (entry["binary"], fake.binary)):
            assert (shipped / rel).read_bytes() == data
            assert manifest["files"][rel] == {"bytes": len(data), "sha256": artifact_format.chunk_digests(data)}


def test_loading_seeds_triton_cache_where_its_compiler_looks(shipped, on_gpu):
    from triton.runtime.cache import FileCacheManager

    loaded = fusegen.load(shipped)
    report = loaded.triton_binaries
    # the kernel this fusegen does not define is left out, with its reason
    assert (report.shipped, report.seeded, report.present, report.ignored) == (2, 1, 0, 1)
    assert "no kernel of this fusegen" in report.reasons[0]
    group = FileCacheManager("DIRONE").get_group("_fused_kernel.json")   # what compile() asks
    assert group == {"_fused_kernel.json": str(on_gpu / "DIRONE" / "_fused_kernel.json"),
                     "_fused_kernel.cubin": str(on_gpu / "DIRONE" / "_fused_kernel.cubin")}
    assert Path(group["_fused_kernel.cubin"]).read_bytes() == FAKE[0].binary
    assert not (on_gpu / "DIRTWO").exists()
    again = fusegen.load(shipped).triton_binaries
    assert (again.seeded, again.present) == (0, 1)


def test_a_changed_binary_is_refused_and_never_reaches_triton(shipped, on_gpu):
    rel = _manifest(shipped)["triton_binaries"]["entries"][0]["binary"]
    data = bytearray((shipped / rel).read_bytes())
    data[-1] ^= 1
    (shipped / rel).write_bytes(bytes(data))
    with pytest.raises(ArtifactTamperedError, match=f"^{rel}: content differs"):
        fusegen.load(shipped)
    assert not on_gpu.exists() or not any(on_gpu.rglob("*.cubin"))


@pytest.mark.parametrize("target,why", [
    (triton_cache.TargetKey("3.6.0", "NVIDIA A100-SXM4-80GB", (8, 0)), "compiled with GPU NVIDIA H200, this is NVIDIA A100"),
    (triton_cache.TargetKey("3.5.1", "NVIDIA H200", (9, 0)), "compiled with Triton 3.6.0, this is 3.5.1"),
    (None, "no binaries run on cpu"),
])
def test_binaries_of_another_target_are_ignored_and_the_model_loads(shipped, on_gpu, monkeypatch, caplog,
                                                                     target, why):
    monkeypatch.setattr(triton_cache.TargetKey, "of", classmethod(lambda cls, device: target))
    with caplog.at_level("INFO", logger="fusegen.artifact"):
        loaded = fusegen.load(shipped)
    report = loaded.triton_binaries
    assert (report.seeded, report.ignored) == (0, 2) and report.reasons[0].startswith(why)
    assert why in caplog.text and "kernels compile from source" in caplog.text
    assert not on_gpu.exists()
    ids = torch.tensor([[5, 9, 3, 77]])
    assert torch.equal(loaded.generate(ids, 4), fusegen.load(shipped, triton_binaries=False).generate(ids, 4))


def test_binaries_turned_off_at_load(shipped, on_gpu):
    report = fusegen.load(shipped, triton_binaries=False).triton_binaries
    assert report.used == 0 and report.reasons == ("turned off (triton_binaries=False)",)
    assert not on_gpu.exists()


@pytest.mark.parametrize("edit", [
    lambda e: e.update(binary="weights/00000.safetensors"),       # another file than its fields name
    lambda e: e.update(dir="../../etc", metadata="triton/../../etc/_fused_kernel.json"),
    lambda e: e.pop("source_hash"),
])
def test_malformed_binary_entries_name_the_manifest(shipped, edit):
    manifest = _manifest(shipped)
    edit(manifest["triton_binaries"]["entries"][0])
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactFormatError, match="^manifest.json: triton_binaries"):
        fusegen.load(shipped)


def test_a_cpu_export_ships_no_binaries(llama, tmp_path):
    assert _manifest(llama.save(tmp_path / "a"))["triton_binaries"] is None


def test_seed_leaves_a_complete_entry_alone(tmp_path):
    first = triton_cache.seed(FAKE[:1], tmp_path)
    changed = triton_cache.Binary(*[getattr(FAKE[0], f) for f in ("dir", "name", "ext", "function", "source_hash",
                                                                    "metadata")], b"other")
    second = triton_cache.seed([changed], tmp_path)
    assert (first.written, second.written, second.present) == (1, 0, 1)
    assert (tmp_path / "DIRONE" / "_fused_kernel.cubin").read_bytes() == FAKE[0].binary
    assert not [p for p in tmp_path.rglob("*") if ".tmp." in p.name]


# --- weights streamed in parallel ------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Hash chunks of 64 KiB, so that a mini model's shard has several and tensors span them."""
    monkeypatch.setattr(artifact_format, "HASH_CHUNK", 1 << 16)
    monkeypatch.setattr(artifact_weights, "HASH_CHUNK", 1 << 16)


def test_streamed_read_is_bitwise_the_mapped_one(llama, tmp_path, small_chunks):
    saved = llama.save(tmp_path / "artifact")
    manifest = _manifest(saved)
    assert max(len(f["sha256"]) for f in manifest["files"].values()) > 3
    cpu = torch.device("cpu")
    streamed = artifact_weights.read_weights(saved, manifest["weights"], manifest["files"], cpu, streamed=True)
    mapped = artifact_weights.read_weights(saved, manifest["weights"], manifest["files"], cpu, streamed=False)
    assert streamed.keys() == mapped.keys() == set(manifest["weights"]["tensors"]) | set(manifest["weights"]["aliases"])
    for name, tensor in mapped.items():
        got = streamed[name]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(got.view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("where", ["header", "middle", "last byte"])
def test_streamed_read_refuses_a_changed_chunk(llama, tmp_path, small_chunks, where):
    saved = llama.save(tmp_path / "artifact")
    manifest = _manifest(saved)
    shard = saved / "weights/00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[{"header": 20, "middle": len(data) // 2, "last byte": len(data) - 1}[where]] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises((ArtifactTamperedError, ArtifactFormatError), match="^weights/00000.safetensors: "):
        artifact_weights.read_weights(saved, manifest["weights"], manifest["files"], torch.device("cpu"),
                                      streamed=True)


# --- CUDA graphs captured per bucket on first use ---------------------------------------------

class _Graph:
    def __init__(self, num_tokens, num_seqs):
        self.num_tokens, self.num_seqs, self.captured = num_tokens, num_seqs, False


class _Graphs(StepGraphs):
    """StepGraphs' bookkeeping with the CUDA parts replaced by a record of the captures."""

    def _make(self, num_tokens, num_seqs):
        return _Graph(num_tokens, num_seqs)

    def _capture(self, graphs):
        self.order = getattr(self, "order", []) + [[(g.num_tokens, g.num_seqs) for g in graphs]]
        for g in graphs:
            g.captured = True


def test_eager_capture_takes_every_bucket_at_once_largest_first():
    graphs = _Graphs(None, [1, 2, 4], [8, 16])
    assert graphs.order == [[(16, 4), (8, 4), (4, 4), (2, 2), (1, 1)]]
    assert graphs.pick(3, 1).num_tokens == 4 and len(graphs.order) == 1


def test_lazy_capture_takes_a_bucket_at_its_first_step_only():
    graphs = _Graphs(None, [1, 2, 4], [8, 16], lazy=True)
    assert not hasattr(graphs, "order") and graphs.captured == []
    assert (graphs.pick(1, 1).num_tokens, graphs.pick(1, 1).num_tokens) == (1, 1)   # a decode, twice
    assert graphs.pick(7, 1).num_tokens == 8                                       # a prefill
    assert graphs.pick(17, 1) is None                                              # no bucket holds it
    assert graphs.order == [[(1, 1)], [(8, 4)]]
    assert graphs.captured == [(1, 1), (8, 4)] and graphs.buckets == [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)]


def test_lazy_capture_is_a_runtime_field_a_loaded_model_may_set(llama, tmp_path):
    saved = llama.save(tmp_path / "artifact", )
    assert fusegen.load(saved, runtime="lazy_cuda_graphs=1,max_num_seqs=8").config == \
        llama.config.replace(lazy_cuda_graphs=True, max_num_seqs=8)
    with pytest.raises(ConfigError, match="gqa_kv_heads: only the engine's fields"):
        fusegen.load(saved, runtime="gqa_kv_heads=1")
    assert CompileConfig.from_string("lazy_cuda_graphs=1").lazy_cuda_graphs


# --- measured kernel choices ------------------------------------------------------------------

PREFILL_KEY = "NVIDIA H200 | triton 3.6.0 | paged bfloat16 D128 causal1 window0 softcap0 group4 page16 T512 L512 R1 auto"
OTHER_GPU_KEY = "NVIDIA A100-SXM4-80GB | triton 3.6.0 | flash bfloat16 D64 causal1 window0 softcap0 group1 page0 T64 L64 R8 auto"


@pytest.fixture
def measured(monkeypatch):
    """A process that measured one GEMM shape under PDL, one where cuBLAS won, and prefill
    tiles on this H200 and on another GPU; both tables restored afterwards."""
    table = skinny_gemm.GemmTable()
    table.choices[(1, 2048, 8192, torch.bfloat16, False, "pdl")] = skinny_gemm.Choice(
        1, 2048, 8192, skinny_gemm.GemmConfig(16, 256, split_k=4), 9.5, 13.4, "none", 9.5)
    table.choices[(4, 3072, 2048, torch.bfloat16, False)] = skinny_gemm.Choice(4, 3072, 2048, None, 6.6, 6.6, "none", 7.9)
    table.trace[(4, 3072, 2048, torch.bfloat16, False)] = {skinny_gemm.GemmConfig(16, 128, split_k=2): 7.9,
                                                           skinny_gemm.GemmConfig(8, 256): 8.4}
    monkeypatch.setattr(skinny_gemm, "TABLE", table)
    monkeypatch.setattr(prefill_tuning, "_choices", {PREFILL_KEY: "hopper_m128_n64_w8_s3",
                                                     OTHER_GPU_KEY: "hopper_m64_n64_w4_s3"})
    monkeypatch.setattr(prefill_tuning, "_read_disk", lambda: {})
    return table


def test_measured_choices_travel_with_the_artifact(llama, on_gpu, measured, tmp_path, monkeypatch):
    """Exported on the H200: the GEMM rows and this GPU's prefill classes are in the
    manifest; loaded into a process that measured nothing, they are its table, and an
    engine there times none of those shapes again."""
    saved = llama.save(tmp_path / "artifact")
    record = _manifest(saved)["tuning"]
    assert record["target"] == KEY.to_dict() and record["prefill"] == {PREFILL_KEY: {"choice": "hopper_m128_n64_w8_s3"}}
    assert sorted((r["M"], r["pdl"], r["config"] is None) for r in record["gemm"]) == [(1, True, False), (4, False, True)]
    fresh = skinny_gemm.GemmTable()
    monkeypatch.setattr(skinny_gemm, "TABLE", fresh)
    monkeypatch.setattr(prefill_tuning, "_choices", {})
    loaded = fusegen.load(saved)
    assert (loaded.tuning.gemm, loaded.tuning.prefill) == (2, 1)
    assert prefill_tuning._choices == {PREFILL_KEY: "hopper_m128_n64_w8_s3"}
    assert fresh.choices == measured.choices and fresh.measured == 0
    with launch.dependent_launches(True):
        assert fresh.lookup(1, 2048, 8192, torch.bfloat16, False) == skinny_gemm.GemmConfig(16, 256, split_k=4)
    assert fresh.lookup(1, 2048, 8192, torch.bfloat16, False) is None       # measured under PDL only
    assert fresh.lookup(4, 3072, 2048, torch.bfloat16, False) is None       # cuBLAS won there
    # the template's best stays known where cuBLAS won: the fused GEMMs are built on it
    assert fresh.best_template(4, 3072, 2048, torch.bfloat16, False) == skinny_gemm.GemmConfig(16, 128, split_k=2)


def test_measured_choices_of_another_gpu_are_left_alone(llama, on_gpu, measured, tmp_path, monkeypatch, caplog):
    saved = llama.save(tmp_path / "artifact")
    fresh = skinny_gemm.GemmTable()
    monkeypatch.setattr(skinny_gemm, "TABLE", fresh)
    monkeypatch.setattr(prefill_tuning, "_choices", {})
    other = triton_cache.TargetKey("3.6.0", "NVIDIA A100-SXM4-80GB", (8, 0))
    monkeypatch.setattr(triton_cache.TargetKey, "of", classmethod(lambda cls, device: other))
    with caplog.at_level("INFO", logger="fusegen.artifact"):
        loaded = fusegen.load(saved)
    assert (loaded.tuning.gemm, loaded.tuning.prefill) == (0, 0)
    assert loaded.tuning.reason == "compiled with GPU NVIDIA H200, this is NVIDIA A100-SXM4-80GB"
    assert "measured kernel choices are not used" in caplog.text
    assert fresh.choices == {} and prefill_tuning._choices == {}


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["gemm"][0].update(dtype="float8"), "GEMM table row"),
    (lambda t: t["gemm"][0].update(config={"block_n": 16, "tiles": 3}), "GEMM table row"),
    (lambda t: t["prefill"].update({PREFILL_KEY: {"choice": "no_such_tiles"}}), "names no configuration"),
    (lambda t: t.update(gemm="rows"), "malformed field 'tuning'"),
])
def test_a_malformed_tuning_record_is_refused(llama, on_gpu, measured, tmp_path, monkeypatch, edit, message):
    saved = llama.save(tmp_path / "artifact")
    manifest = _manifest(saved)
    edit(manifest["tuning"])
    (saved / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(skinny_gemm, "TABLE", skinny_gemm.GemmTable())
    with pytest.raises(ArtifactFormatError, match=message):
        fusegen.load(saved)


def test_a_cpu_export_ships_no_measured_choices(llama, tmp_path):
    assert _manifest(llama.save(tmp_path / "artifact"))["tuning"] is None


# --- on the GPU --------------------------------------------------------------------------------

CHILD = """
import json, sys, torch, fusegen
from fusegen.codegen import triton_cache
with triton_cache.count_compiles() as counts:
    model = fusegen.load(sys.argv[1], runtime="lazy_cuda_graphs=1")
    out = model.generate(torch.tensor([[5, 9, 3, 77, 12, 40]], device="cuda"), 12)
    torch.cuda.synchronize()
report = model.triton_binaries
from fusegen.codegen import skinny_gemm
print(json.dumps({"tokens": out[0].tolist(), "hits": counts["hits"], "misses": counts["misses"],
                  "gemm_measured": skinny_gemm.TABLE.measured, "gemm_seeded": model.tuning.gemm,
                  "seeded": report.seeded, "ignored": report.ignored, "reasons": report.reasons,
                  "captured": model._engine.setup["captured"]}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_fresh_process_loads_the_shipped_binaries_and_compiles_no_kernel(tmp_path):
    model = mini_model("llama").cuda()   # fp32: the loaded graph's linears run unfused (fuse_gemms)
    compiled = fusegen.compile(model, "kv_blocks=64,max_num_seqs=4,max_num_batched_tokens=64")
    ids = torch.tensor([[5, 9, 3, 77, 12, 40]], device="cuda")
    want = compiled.generate(ids, 12)[0].tolist()
    saved = compiled.save(tmp_path / "artifact")
    assert len(_manifest(saved)["triton_binaries"]["entries"]) > 0
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "empty-triton-cache"),
               FUSEGEN_CACHE=str(tmp_path / "empty-fusegen-cache"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(saved)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tokens"] == want
    assert got["misses"] == 0 and got["hits"] > 0, got
    assert got["seeded"] > 0 and got["ignored"] == 0, got
    assert len(got["captured"]) <= 2, got   # lazily: the prompt's bucket and the decode bucket
    assert got["gemm_seeded"] > 0 and got["gemm_measured"] == 0, got   # the shipped GEMM table
