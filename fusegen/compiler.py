"""``fusegen.compile``: capture -> passes -> a CompiledModel."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fusegen.capture import capture, mask_positions, model_class_name, position_convention
from fusegen.codegen.lower import lower
from fusegen.config import CompileConfig
from fusegen.errors import ConfigError, UnsupportedModelError
from fusegen.fidelity import check_compiled
from fusegen.passes.dump import DumpWriter, PassRecord, op_table, resolve_dump_dir, summary_table
from fusegen.passes.infra import PassContext
from fusegen.passes.pipeline import build_pipeline, run_pipeline
from fusegen.progress import Bar, stage
from fusegen.runtime.dense import DenseRunner
from fusegen.runtime.cpu_graph import column_major_weights
from fusegen.runtime.cuda_graphs import decode_buckets, token_buckets
from fusegen.runtime.engine import Engine
from fusegen.runtime.generate import greedy_dense
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import Chunk, PagedRunner, packed_inputs
from fusegen.runtime.draft import DraftProposer
from fusegen.runtime.speculative import NgramProposer

log = logging.getLogger(__name__)


@dataclass
class CompileReport:
    model_class: str
    config: CompileConfig
    records: list[PassRecord] = field(default_factory=list)
    dump_dir: str | None = None

    @property
    def counters(self) -> Counter:
        """Every rewrite counter, as ``"<pass>.<counter>"``."""
        total: Counter = Counter()
        for r in self.records:
            total.update({f"{r.name}.{k}": v for k, v in r.stats.items()})
        return total

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def table(self) -> str:
        head = f"{self.model_class}  config: {self.config}  total: {self.seconds:.2f} s"
        return head + "\n" + summary_table(self.records)

    def op_table(self) -> str:
        return op_table(self.records)


class CompiledModel:
    """A captured and optimized model. Call it like the HF model's forward for logits;
    ``generate`` like HF's greedy ``generate``."""

    def __init__(self, gm: fx.GraphModule, report: CompileReport, facts: dict):
        self.graph_module = gm
        self.report = report
        self.facts = facts
        names = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
        self.kind = "paged" if "kv_pool" in names else "dense" if "kv_cache" in names else "stateless"
        self.tokenizer_path = None  # set when loaded from an artifact that ships its tokenizer
        self.tp_group = None   # this process's rank when compiled or loaded with tp > 1 (fusegen/distributed.py)
        self._tokenizer = None
        if facts.get("device") is not None and torch.device(facts["device"]).type == "cpu":
            # the layout the CPU BLAS reads fastest in decode (values unchanged), for every
            # CPU run of this graph alike: compiled and loaded models compute bit for bit the same
            column_major_weights(gm)

    @property
    def config(self) -> CompileConfig:
        return self.report.config

    @property
    def tokenizer(self):
        """The tokenizer shipped in the artifact this model was loaded from (None otherwise)."""
        if self._tokenizer is None and self.tokenizer_path is not None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=False,
                                                            local_files_only=True)
        return self._tokenizer

    def save(self, directory, tokenizer=None, onnx: bool = False, sign_key=None, progress: bool = False):
        """Write this model as an artifact (see ``fusegen.artifact``); ``fusegen.load`` reads it.
        ``sign_key``: an Ed25519 private key (PEM path or bytes) that signs it."""
        from fusegen.artifact import export

        return export(self, directory, tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                      onnx=onnx, sign_key=sign_key, progress=progress)

    @property
    def device(self) -> torch.device:
        return self.facts["device"]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V] for ``input_ids`` [B, S]; ``attention_mask`` [B, S] marks real tokens
        (left padding). ``position_ids`` default to what the model's own forward uses:
        0..S-1 in every row (Llama, GPT-2, ...) or counted over the real tokens (OPT).
        Padding positions of a stateful graph get zero logits (they are never computed)."""
        input_ids, attention_mask, position_ids = _full_inputs(input_ids, attention_mask, position_ids,
                                                               self.facts.get("vocab_size"), self.device,
                                                               self.facts.get("positions", "arange"))
        self._check_length(input_ids.shape[1])
        if self.kind == "stateless":
            return self.graph_module(input_ids, attention_mask, position_ids)
        if self.kind == "dense":
            runner = DenseRunner(self.graph_module, self.facts["kv"], input_ids.shape[0],
                                 input_ids.shape[1], input_ids.device)
            return runner.step(input_ids, attention_mask, position_ids)
        return self._paged_forward(input_ids, attention_mask, position_ids)

    def _paged_forward(self, input_ids, attention_mask, position_ids):
        real = attention_mask.bool()
        tokens = [input_ids[b, real[b]].tolist() for b in range(input_ids.shape[0])]
        positions = [position_ids[b, real[b]].tolist() for b in range(input_ids.shape[0])]
        geometry = self.facts["kv"]
        kv = KVCacheManager(sum(-(-len(t) // geometry.block_size) for t in tokens), geometry.block_size,
                            enable_prefix_caching=False)
        chunks = []
        for i, (ids, pos) in enumerate(zip(tokens, positions)):
            kv.admit(i, ids, len(ids))
            chunks.append(Chunk(ids, pos, 0, kv.blocks(i)))
        runner = PagedRunner(self.graph_module, geometry, kv.num_blocks, self.device)
        logits = self.graph_module(**packed_inputs(runner, chunks))[0]
        out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
        out[real] = logits
        return out

    def engine(self, num_blocks: int | None = None, cuda_graphs: bool = True, *, draft=None,
               **kwargs) -> Engine:
        """A serving engine over this paged graph: continuous batching, chunked prefill,
        prefix caching, preemption, the host overlapped with the GPU (``overlap=False`` to
        turn that off). ``num_blocks`` defaults to ``config.kv_blocks`` or, when that is 0,
        to what fits (half the free GPU memory; on CPU, max_num_seqs full-length sequences
        capped at 1 GiB). On CUDA every step shape replays a CUDA graph (``engine.setup``
        reports their capture time and memory). With ``config.speculative`` the engine
        decodes speculatively (runtime/speculative.py); ``draft``: the CompiledModel that
        proposes with ``speculative=draft`` (else ``config.spec_draft`` is loaded), or
        ``proposer=`` any proposer object."""
        if self.kind != "paged":
            raise ValueError(f"engine needs a paged graph, this one is {self.kind}; compile with paged_kv=1")
        with stage(f"setting up the engine on {self.device}"):
            runner = self._runner(num_blocks or self._auto_blocks())
            kwargs.setdefault("max_num_batched_tokens", self.config.max_num_batched_tokens)
            kwargs.setdefault("max_num_seqs", self.config.max_num_seqs)
            if "proposer" not in kwargs:
                kwargs["proposer"] = self._proposer(draft, runner, kwargs.get("max_model_len") or self._max_len(),
                                                    kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"],
                                                    cuda_graphs)
            kwargs.setdefault("max_model_len", self._max_len())
            engine = Engine(runner, sorted(_eos_set(self.facts.get("eos_token_id"))),
                            vocab_size=self.facts.get("vocab_size"), **kwargs)
            if cuda_graphs and self.config.cuda_graphs and self.device.type == "cuda" and self.tp_group is not None:
                log.info("tp=%d: the engine runs its steps eagerly (no CUDA graphs across ranks yet)", self.config.tp)
            elif cuda_graphs and self.config.cuda_graphs and self.device.type == "cuda":
                seqs, tokens = kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]
                # a speculating decode enters the step as 1 + k one-token entries
                entries = seqs * (1 + kwargs["proposer"].k) if kwargs["proposer"] is not None else seqs
                runner.capture_graphs(decode_buckets(entries), token_buckets(entries, tokens),
                                      skinny_gemms=self.config.skinny_gemm, pdl=self.config.pdl,
                                      epilogues=self.config.gemm_epilogue, lazy=self.config.lazy_cuda_graphs)
            runner.step_graph()   # on the CPU its flat copy is made now, not in the first step
        return engine

    def _runner(self, num_blocks: int) -> PagedRunner:
        """The engine's runner: with tp > 1 rank 0's, which broadcasts every step to the
        other ranks (they run ``follow``)."""
        group = self.tp_group
        if group is None:
            return PagedRunner(self.graph_module, self.facts["kv"], num_blocks, self.device)
        if not group.is_driver:
            raise ValueError(f"rank {group.rank} of tp={group.size}: only rank 0 runs the engine; the other "
                             f"ranks call follow(), which runs its steps")
        from fusegen.runtime.tensor_parallel import LeadRunner

        return LeadRunner(self.graph_module, self.facts["kv"], num_blocks, self.device, group)

    def follow(self) -> int:
        """Ranks > 0 of a tensor-parallel model: run the steps of rank 0's engines on this
        rank's shard until rank 0 calls ``stop_followers``; returns how many ran."""
        from fusegen.runtime.tensor_parallel import follow

        if self.tp_group is None or self.tp_group.is_driver:
            raise ValueError("follow() is for ranks > 0 of a tensor-parallel model (tp > 1)")
        return follow(self.graph_module, self.facts["kv"], self.device, self.tp_group)

    def stop_followers(self) -> None:
        """Rank 0 of a tensor-parallel model: let the other ranks' ``follow`` return."""
        from fusegen.runtime.tensor_parallel import stop_followers

        if self.tp_group is None or not self.tp_group.is_driver:
            raise ValueError("stop_followers() is for rank 0 of a tensor-parallel model (tp > 1)")
        stop_followers(self.tp_group, self.device)

    def _proposer(self, draft, runner: PagedRunner, max_model_len: int, max_num_seqs: int,
                  max_num_batched_tokens: int, cuda_graphs: bool):
        """The proposer ``config.speculative`` asks for (None for "none")."""
        cfg = self.config
        if draft is not None and cfg.speculative != "draft":
            raise ValueError(f"engine(draft=...) needs speculative=draft, the config has speculative={cfg.speculative}")
        if cfg.speculative == "ngram":
            return NgramProposer(cfg.spec_k, cfg.spec_ngram)
        if cfg.speculative != "draft":
            return None
        if draft is None:
            if not cfg.spec_draft:
                raise ConfigError("speculative=draft needs spec_draft=PATH (a model directory or a fusegen "
                                  "artifact) or engine(draft=compiled_draft)")
            draft = self._load_draft(cfg.spec_draft)
        if draft.kind != "paged":
            raise ConfigError(f"the draft model is compiled {draft.kind}; speculative=draft needs its paged graph")
        vocab, draft_vocab = self.facts.get("vocab_size"), draft.facts.get("vocab_size")
        if vocab != draft_vocab:
            raise ConfigError(f"the draft model ({draft.report.model_class}) has a vocabulary of {draft_vocab}, "
                              f"the target ({self.report.model_class}) {vocab}: they must share the tokenizer")
        # as many tokens in the draft's pool as in the target's
        tokens = runner.num_blocks * runner.block_size
        geometry = draft.facts["kv"]
        draft_runner = PagedRunner(draft.graph_module, geometry, -(-tokens // geometry.block_size), draft.device)
        proposer = DraftProposer(draft_runner, cfg.spec_k, max_num_seqs, min(max_model_len, draft.max_len),
                                 max_num_batched_tokens)
        if cuda_graphs and draft.config.cuda_graphs and draft.device.type == "cuda":
            draft_runner.capture_graphs(decode_buckets(max_num_seqs), token_buckets(max_num_seqs, max_num_batched_tokens),
                                        skinny_gemms=draft.config.skinny_gemm, pdl=draft.config.pdl,
                                        epilogues=draft.config.gemm_epilogue, lazy=draft.config.lazy_cuda_graphs)
        draft_runner.step_graph()
        return proposer

    def _load_draft(self, path: str) -> "CompiledModel":
        """``spec_draft``: a fusegen artifact (loaded as it is) or a model directory (compiled
        with this config, speculation off), on this model's device."""
        from pathlib import Path

        from fusegen.artifact import MANIFEST, load
        from fusegen.models import load_model

        if (Path(path) / MANIFEST).is_file():
            return load(path, self.device)
        model = load_model(path, dtype=self.facts.get("dtype", torch.float32)).to(self.device)
        return compile(model, self.config.replace(speculative="none", spec_draft=""))

    def _auto_blocks(self) -> int:
        kv = self.facts["kv"]
        if self.config.kv_blocks:
            return self.config.kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * 0.5) // kv.bytes_per_block)
        want = self.config.max_num_seqs * -(-self._max_len() // kv.block_size)
        return max(1, min(want, (1 << 30) // kv.bytes_per_block))

    @property
    def max_len(self) -> int:
        """The longest sequence (prompt plus new tokens) this model serves: the compiled
        ``max_seq_len`` or the model's positions, whichever is fewer."""
        return self._max_len()

    def _max_len(self) -> int:
        limits = [self.config.max_seq_len, self.facts.get("max_position_embeddings") or self.facts.get("n_positions")]
        return min(n for n in limits if n)

    @property
    def _engine(self) -> Engine:
        with _ENGINE_LOCK:   # one shared engine, even when threads ask for it at once
            if getattr(self, "_shared_engine", None) is None:
                self._shared_engine = self.engine()
            return self._shared_engine

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 20, **sampling) -> list[list[int]]:
        """New tokens for many requests (token lists), continuously batched. ``sampling``:
        do_sample, temperature, top_k, top_p, repetition_penalty, seed, eos_token_id."""
        return self._engine.generate_batch(prompts, max_new_tokens, **_sampling(**sampling))

    def stream(self, prompt: list[int], max_new_tokens: int = 20, **sampling):
        """Yield the new tokens of one request as they are produced."""
        return self._engine.stream(prompt, max_new_tokens, **_sampling(**sampling))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None,
                 attention_mask: torch.Tensor | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None) -> torch.Tensor:
        """HF-style ``generate``: returns [B, S + n], the (left-padded) prompts followed by the
        new tokens, rows that stopped early (eos) filled with the pad id. Arguments left None
        come from the model's ``generation_config``, as in HF (eos ids, pad id, max_new_tokens
        or max_length, do_sample and the sampling values); ``seed`` makes sampling
        reproducible."""
        if self.kind == "stateless":
            raise ValueError("generate needs a stateful graph; compile with insert_kv_cache=1")
        input_ids, attention_mask, _ = _full_inputs(input_ids, attention_mask, None,
                                                    self.facts.get("vocab_size"), self.device)
        g = _GenerationDefaults(self.facts.get("generation") or {})
        max_new_tokens = g.max_new_tokens(max_new_tokens, input_ids.shape[1])
        do_sample = g.pick(do_sample, "do_sample", False)
        temperature, top_k = g.pick(temperature, "temperature", 1.0), g.pick(top_k, "top_k", 50)
        top_p, repetition_penalty = g.pick(top_p, "top_p", 1.0), g.pick(repetition_penalty, "repetition_penalty", 1.0)
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature} "
                             f"(use do_sample=False for greedy decoding)")
        eos_list = _eos_list(g.pick(eos_token_id, "eos_token_id", self.facts.get("eos_token_id")))
        eos = set(eos_list)
        real = attention_mask.bool()
        prompts = [input_ids[b, real[b]].tolist() for b in range(input_ids.shape[0])]
        self._check_length(max(len(p) for p in prompts) + max_new_tokens)
        sampling = _sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed)
        if self.kind == "paged":
            bs = self.facts["kv"].block_size
            engine = self._engine if self.device.type == "cuda" else self.engine(
                num_blocks=sum(-(-(len(p) + max_new_tokens) // bs) for p in prompts),
                max_num_batched_tokens=sum(len(p) for p in prompts), max_num_seqs=len(prompts))
            new = engine.generate_batch(prompts, max_new_tokens, eos_token_ids=sorted(eos), **sampling)
        else:
            if do_sample:
                raise ValueError("the dense-cache graph decodes greedily only; use the paged graph to sample")
            runner = DenseRunner(self.graph_module, self.facts["kv"], input_ids.shape[0],
                                 input_ids.shape[1] + max_new_tokens, input_ids.device)
            new = greedy_dense(runner, input_ids, attention_mask, max_new_tokens, eos)
        pad = g.pick(pad_token_id, "pad_token_id", eos_list[0] if eos_list else 0)   # HF: the first eos
        width = max(len(n) for n in new)
        rows = [n + [pad] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)], 1)

    def _check_length(self, total: int) -> None:
        limit = self.facts.get("max_position_embeddings") or self.facts.get("n_positions")
        if limit and total > limit:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's "
                             f"{limit} positions")
        # Attention semantics (e.g. a sliding window) were proven up to this length.
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len="
                             f"{self.config.max_seq_len} the model was compiled for")

    def __repr__(self) -> str:
        return f"CompiledModel({self.report.model_class}, config={self.config})"


_ENGINE_LOCK = threading.Lock()


def _sampling(do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              repetition_penalty: float = 1.0, seed: int | None = None, eos_token_id=None) -> dict:
    """HF's argument names -> the runtime's SamplingParams fields (greedy = temperature 0)."""
    params = {"temperature": temperature if do_sample else 0.0, "top_k": top_k, "top_p": top_p,
              "repetition_penalty": repetition_penalty, "seed": seed}
    if eos_token_id is not None:
        params["eos_token_ids"] = sorted(_eos_set(eos_token_id))
    return params


class _GenerationDefaults:
    """The model's ``generation_config`` values (kept in the facts), filling in arguments a
    ``generate`` call leaves None, with HF's own defaults behind them."""

    def __init__(self, values: dict):
        self.values = values

    def pick(self, given, key: str, fallback):
        if given is not None:
            return given
        value = self.values.get(key)
        return value if value is not None else fallback

    def max_new_tokens(self, given, prompt_width: int) -> int:
        if given is None and self.values.get("max_new_tokens") is not None:
            given = self.values["max_new_tokens"]
        if given is None:   # HF: max_length counts the prompt (20 by default)
            given = self.values.get("max_length", 20) - prompt_width
            if given < 1:
                raise ValueError(f"the prompt's {prompt_width} tokens reach the generation config's "
                                 f"max_length={self.values.get('max_length', 20)}; pass max_new_tokens")
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {given}")
        return given


GENERATION_FIELDS = ("max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "do_sample",
                     "temperature", "top_k", "top_p", "repetition_penalty")


def _eos_list(eos) -> list[int]:
    """eos ids in their given order (HF pads with the first)."""
    if eos is None:
        return []
    items = eos if isinstance(eos, (list, tuple)) else sorted(eos) if isinstance(eos, set) else [eos]
    return list(dict.fromkeys(int(e) for e in items))


def _eos_set(eos) -> set[int]:
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}


def _full_inputs(input_ids, attention_mask, position_ids, vocab_size: int | None = None,
                 device: torch.device | None = None, positions: str = "arange"):
    """Checked inputs: integer ids [B, S] within the vocabulary, on the model's device; a 0/1
    mask of the same shape whose rows are left-padded (zeros, then ones; at least one one)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape}")
    _check_ids_tensor(input_ids, "input_ids", vocab_size, device)
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"input_ids is empty: shape {(B, S)}")
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask shape {shape} != input_ids shape {(B, S)}")
    else:
        _check_left_padded(attention_mask)
    if position_ids is None and positions == "mask":
        position_ids = mask_positions(attention_mask)
    elif position_ids is None:
        position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
    else:
        _check_ids_tensor(position_ids, "position_ids", None, device)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {(B, S)}")
    return input_ids, attention_mask.long(), position_ids


def _check_ids_tensor(t: torch.Tensor, name: str, vocab_size: int | None, device) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    if device is not None and t.device.type != torch.device(device).type:
        raise ValueError(f"{name} is on {t.device}, the model on {device}")
    low, high = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {bad}, not a token id of this model (vocabulary of {vocab_size})"
                         if name == "input_ids" else f"{name} holds {bad}, which is negative")


def _check_left_padded(mask: torch.Tensor) -> None:
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"attention_mask must hold 0 and 1 as integers or bools, got {mask.dtype}")
    m = mask.long()
    if ((m != 0) & (m != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (m[:, 1:] < m[:, :-1]).any():
        row = int((m[:, 1:] < m[:, :-1]).any(1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is not left-padded (a 0 after a 1); fusegen "
                         f"takes left padding only")
    if (m.sum(1) == 0).any():
        row = int((m.sum(1) == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} needs at least one real token (a 1)")


def compile(model: nn.Module, config: CompileConfig | str | None = None, *, dump_dir=None,
            calibration_ids: torch.Tensor | None = None, progress: bool = False) -> CompiledModel:
    """Capture ``model`` and run the pass pipeline. ``dump_dir`` (or $FUSEGEN_DUMP_DIR) writes
    the graph after every pass and a summary; ``progress`` shows a bar over the steps. The
    user's model is left as it was."""
    if config is None:
        config = CompileConfig()
    elif isinstance(config, str):
        config = CompileConfig.from_string(config)
    directory = resolve_dump_dir(dump_dir)
    with stage(f"compiling {model_class_name(model)} ({config})"), \
            Bar(len(build_pipeline(config)) + 2, "compiling", progress, unit="step") as steps:
        steps.update(0, "capture")
        start = time.perf_counter()
        gm = capture(model, by_layer=config.capture_by_layer)
        capture_seconds = time.perf_counter() - start
        ctx = PassContext(config=config, calibration_ids=calibration_ids, facts=_model_facts(model),
                          tp_group=_tp_group(config, model))
        dump = DumpWriter(directory) if directory else None
        gm, records = run_pipeline(gm, ctx, dump, capture_seconds, on_pass=lambda name: steps.update(1, name))
        steps.update(1, "kernels")
        ctx.facts["kernels"] = lower(gm, directory)
        steps.update(1)
    if ctx.facts["device"].type == "cuda":
        _check_kernels_serve(model, ctx.facts)
    report = CompileReport(model_class_name(model), config, records, str(directory) if directory else None)
    compiled = CompiledModel(gm, report, ctx.facts)
    compiled.tp_group = ctx.tp_group
    if not config.gqa_kv_heads:   # the lossy conversion measures and reports its own change
        with stage("checking the compiled graph against the model"), \
                _reference(model, config, ctx.reference_changes):
            check_compiled(_unquantized_cache(compiled), model)
    return compiled


def _unquantized_cache(compiled: CompiledModel) -> CompiledModel:
    """``compiled``, or with an fp8 KV pool (kv_dtype=fp8) the same graph over a pool in the
    model's dtype, which stores and reads K and V as they are: the compile-time check then
    holds every pass but the lossy storage to the model's own logits; quantize_kv_cache
    measures that storage's change itself (its ``logit_error``)."""
    kv = compiled.facts.get("kv")
    if kv is None or not kv.quantized:
        return compiled
    return CompiledModel(compiled.graph_module, compiled.report,
                         {**compiled.facts, "kv": kv.with_dtype(compiled.facts["dtype"])})


def _tp_group(config: CompileConfig, model: nn.Module):
    """This process's rank among ``config.tp`` (None for tp=1): the process group torchrun
    or ``fusegen-cli --tp`` started (fusegen/distributed.py)."""
    if config.tp == 1:
        return None
    from fusegen.distributed import join

    return join(config.tp, next(model.parameters()).device)


def _reference(model: nn.Module, config: CompileConfig, changes: dict):
    """What the compiled graph must compute: the model itself, or with quantized weights the
    model with its linear weights replaced by their dequantized values (with AWQ, the
    effective weights of the scales the pass chose: ``changes``)."""
    if config.weights == "none":
        return contextlib.nullcontext(model)
    from fusegen.quant import dequantized_linears

    return dequantized_linears(model, config.weights, config.quantize_lm_head, act_scales=changes)


def _check_kernels_serve(model: nn.Module, facts: dict) -> None:
    """On CUDA the Triton attention kernels run every attention op: a head dim they cannot
    serve is refused now, not at the first step (or inside a CUDA-graph capture)."""
    from fusegen.codegen import attention

    if "kv" in facts:
        try:
            attention.check_head_dim(facts["kv"].head_dim)
        except ValueError as exc:
            raise UnsupportedModelError(model_class_name(model), "attention", str(exc)) from None
        computed = facts["dtype"] if facts["kv"].quantized else facts["kv"].dtype   # an fp8 pool is read into it
        if computed not in (torch.float16, torch.bfloat16, torch.float32):
            raise UnsupportedModelError(model_class_name(model), "attention",
                                        f"the CUDA attention kernels take float16, bfloat16 or float32, "
                                        f"the model is {computed}; cast it first")
    attention.register()


def _model_facts(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    facts = {"model_class": model_class_name(model)}
    if config is not None:
        for key in ("vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "hidden_size", "max_position_embeddings", "eos_token_id", "n_positions"):
            if getattr(config, key, None) is not None:
                facts[key] = getattr(config, key)
        facts["hf_config"] = json.loads(config.to_json_string(use_diff=False)) \
            if hasattr(config, "to_json_string") else None
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.eos_token_id is not None:
        facts["eos_token_id"] = generation.eos_token_id
    if generation is not None:
        facts["generation"] = {key: getattr(generation, key) for key in GENERATION_FIELDS
                               if isinstance(getattr(generation, key, None), (bool, int, float, list))}
    param = next(model.parameters())
    facts["dtype"], facts["device"] = param.dtype, param.device
    facts["positions"] = position_convention(model)
    return facts
