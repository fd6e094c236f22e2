"""One typed compile configuration: a frozen dataclass, named presets, and a one-line
string form (``"preset=default,fuse_attention=1,gqa_kv_heads=1,gqa_method=lsq"``) for the
CLI and logs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from fusegen.errors import ConfigError

GQA_METHODS = ("mean", "lsq", "refit")   # see passes/convert_mha_to_gqa.py
WEIGHT_FORMATS = ("none", "int8", "fp8", "int4")   # see fusegen/quant.py
SPECULATIVE = ("none", "ngram", "draft")           # see runtime/speculative.py
KV_DTYPES = ("auto", "fp8")                         # see fusegen/kv.py, passes/quantize_kv_cache.py
MAX_SPEC_K = 16


@dataclass(frozen=True)
class CompileConfig:
    # Capture: export the first decoder layers, stamp the others (fusegen/capture_layers.py).
    capture_by_layer: bool = True
    # Graph passes.
    cleanup: bool = True
    fuse_attention: bool = True
    strict: bool = False  # an attention site that cannot be proven equivalent is an error
    verify_shapes: bool = False  # re-run the graph symbolically after every pass (slow)
    insert_kv_cache: bool = True
    paged_kv: bool = True
    # Kernels: horizontal fusion of projections, pointwise/row-reduction groups -> Triton.
    fuse_projections: bool = True
    fuse_pointwise: bool = True
    # Lossy, opt-in: reduce the number of KV heads to this many (0 = keep).
    gqa_kv_heads: int = 0
    gqa_method: str = "lsq"
    gqa_refit_steps: int = 400   # Adam steps per layer of gqa_method=refit (0: grouping and lsq only)
    # ... then Adam steps of distillation against the original logits (passes/gqa_distill.py; 0: none).
    gqa_distill_steps: int = 0
    # Lossy, opt-in: linear weights stored as int8 / fp8 / int4 (the LM head too if asked).
    weights: str = "none"
    quantize_lm_head: bool = False
    # int4 with AWQ's per-input-channel scales where calibration tokens are given (fusegen/quant.py).
    int4_awq: bool = True
    # Lossy, opt-in: the paged KV pool stored as fp8 (e4m3, half of bf16's bytes per token) with
    # one fp32 scale per (layer, K|V, KV head), fit on calibration tokens where given
    # (passes/quantize_kv_cache.py). "auto": the model's dtype.
    kv_dtype: str = "auto"
    # Runtime shape of the paged KV pool.
    block_size: int = 16
    # Longest sequence (prompt + generated) the compiled model serves.
    max_seq_len: int = 2048
    # Serving engine: KV blocks in the pool (0 = size from free memory), batch limits per step.
    kv_blocks: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (on CUDA only)
    # ... each captured at the first step of its shape instead of all at engine set-up
    # (runtime/cuda_graphs.py): a faster first token, a capture in the first step of each shape.
    lazy_cuda_graphs: bool = False
    # Decode linears (<= 64 tokens) by the skinny-GEMM template where it beats cuBLAS, as
    # measured at engine set-up (codegen/skinny_gemm.py; CUDA graphs only).
    skinny_gemm: bool = True
    # ... and the pointwise groups such a linear feeds (SiLU*mul) as its epilogue.
    gemm_epilogue: bool = True
    # Programmatic dependent launch between fusegen's kernels inside the CUDA graphs
    # (codegen/launch.py; Hopper or later, ignored elsewhere).
    pdl: bool = False
    # Speculative decoding in the engine (runtime/speculative.py): "ngram" proposes the
    # spec_k tokens that followed the latest earlier occurrence of the request's last
    # spec_ngram tokens (prompt lookup); "draft" has a smaller model (spec_draft: its
    # directory or artifact) propose them. One step verifies them all; outputs are exact.
    speculative: str = "none"
    spec_k: int = 4
    spec_ngram: int = 3
    spec_draft: str = ""
    # Tensor parallelism over this many ranks, one process each (passes/shard_tensor_parallel.py,
    # fusegen/distributed.py): NCCL on CUDA, gloo on the CPU.
    tp: int = 1

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.gqa_method not in GQA_METHODS:
            raise ConfigError(f"gqa_method must be one of {GQA_METHODS}, got {self.gqa_method!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.gqa_kv_heads < 0:
            raise ConfigError(f"gqa_kv_heads must be >= 0, got {self.gqa_kv_heads}")
        if self.gqa_refit_steps < 0:
            raise ConfigError(f"gqa_refit_steps must be >= 0, got {self.gqa_refit_steps}")
        if self.gqa_distill_steps < 0:
            raise ConfigError(f"gqa_distill_steps must be >= 0, got {self.gqa_distill_steps}")
        if self.max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if self.kv_dtype != "auto" and not self.paged_kv:
            raise ConfigError(f"kv_dtype={self.kv_dtype} quantises the paged KV pool and needs paged_kv=1; "
                              f"the dense cache (preset=dense_kv) and stateless graphs keep the model's dtype")
        if self.paged_kv and not self.insert_kv_cache:
            raise ConfigError("paged_kv needs insert_kv_cache")
        if self.insert_kv_cache and not self.fuse_attention:
            raise ConfigError("insert_kv_cache needs fuse_attention")
        self._check_speculative()
        self._check_tp()

    def _check_tp(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")
        if self.tp > 1 and self.weights != "none":
            raise ConfigError(f"tp={self.tp} shards float linears; weights={self.weights} needs tp=1")
        if self.tp > 1 and self.speculative != "none":
            raise ConfigError(f"tp={self.tp} runs the plain engine; speculative={self.speculative} needs tp=1")

    def _check_speculative(self) -> None:
        if self.speculative not in SPECULATIVE:
            raise ConfigError(f"speculative must be one of {SPECULATIVE}, got {self.speculative!r}")
        if not 1 <= self.spec_k <= MAX_SPEC_K:
            raise ConfigError(f"spec_k must be in 1..{MAX_SPEC_K}, got {self.spec_k}")
        if self.spec_ngram < 1:
            raise ConfigError(f"spec_ngram must be >= 1, got {self.spec_ngram}")
        if self.spec_draft and self.speculative != "draft":
            raise ConfigError(f"spec_draft={self.spec_draft!r} is only used with speculative=draft, "
                              f"got speculative={self.speculative}")
        if self.speculative != "none" and not self.paged_kv:
            raise ConfigError(f"speculative={self.speculative} runs in the paged engine: it needs paged_kv")

    @classmethod
    def preset(cls, name: str) -> "CompileConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    def replace(self, **changes) -> "CompileConfig":
        return dataclasses.replace(self, **changes)

    def with_runtime(self, text: str) -> "CompileConfig":
        """This config with the engine-only fields in ``text`` (``k=v,...``) changed: what a
        loaded artifact may change without compiling again."""
        keys = [item.partition("=")[0].strip() for item in text.split(",") if item.strip()]
        bad = [k for k in keys if k not in RUNTIME_FIELDS]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: only the engine's fields ({', '.join(RUNTIME_FIELDS)}) can be "
                              f"set on a compiled model; the others change the compiled graph")
        parsed = CompileConfig.from_string(text)
        return self.replace(**{k: getattr(parsed, k) for k in keys})

    def to_string(self) -> str:
        """Fields that differ from the default, as ``k=v`` pairs; the default is ``default``."""
        default = CompileConfig()
        parts = [
            f"{f.name}={_format(getattr(self, f.name))}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return ",".join(parts) or "default"

    @classmethod
    def from_string(cls, text: str) -> "CompileConfig":
        """Parse ``preset=NAME,field=value,...`` (a preset first, if any, then overrides)."""
        text = text.strip()
        if text in ("", "default"):
            return cls()
        base, overrides = cls(), {}
        types = {f.name: f.type for f in fields(cls)}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                if key in PRESETS:
                    base = PRESETS[key]
                    continue
                raise ConfigError(f"expected key=value or a preset name, got {item!r}")
            if key == "preset":
                base = cls.preset(value)
            elif key in types:
                overrides[key] = _parse(key, types[key], value)
            else:
                raise ConfigError(f"unknown config field {key!r}; fields: {', '.join(types)}")
        return dataclasses.replace(base, **overrides)

    def __str__(self) -> str:
        return self.to_string()


def _format(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _parse(key: str, type_name, value: str):
    type_name = getattr(type_name, "__name__", type_name)
    try:
        if type_name == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if type_name == "int":
            return int(value)
        return value
    except ValueError:
        raise ConfigError(f"config field {key!r} expects {type_name}, got {value!r}") from None


# Fields only the engine reads (fusegen.load(..., runtime="lazy_cuda_graphs=1")).
RUNTIME_FIELDS = ("kv_blocks", "max_num_seqs", "max_num_batched_tokens", "cuda_graphs", "lazy_cuda_graphs",
                  "skinny_gemm", "gemm_epilogue", "pdl")

PRESETS: dict[str, CompileConfig] = {
    "default": CompileConfig(),
    # Only capture and clean up: the graph computes exactly what the model's code does.
    "capture_only": CompileConfig(fuse_attention=False, insert_kv_cache=False, paged_kv=False,
                                  fuse_projections=False, fuse_pointwise=False),
    # Attention fused, still a stateless full-sequence graph.
    "stateless": CompileConfig(insert_kv_cache=False, paged_kv=False),
    # Dense per-sequence KV cache instead of the paged pool.
    "dense_kv": CompileConfig(paged_kv=False),
    # Refuse to leave any attention site unfused.
    "strict": CompileConfig(strict=True),
}
