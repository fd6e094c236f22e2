"""Speculative decoding (runtime/speculative.py, runtime/draft.py) on tiny CPU models: greedy
outputs token for token those of plain decoding on four families, prompt lookup accepting on
a repetitive prompt, the rejected slots' blocks given back (exact ids), eos / max_new_tokens
inside an accepted run, prefix caching, preemption, several tokens per step in streams, and
a chi-square test that seeded sampling with speculation follows plain sampling's
distribution (and fails when acceptance always takes the proposal)."""

import dataclasses
import math
import random
from collections import Counter, defaultdict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusegen
import fusegen.runtime.engine as engine_module
from families import FAMILIES, VOCAB, mini_model
from fusegen.errors import ConfigError
from fusegen.runtime.draft import DraftProposer
from fusegen.runtime.engine import Engine
from fusegen.runtime.kv_manager import KVCacheManager
from fusegen.runtime.paged import PagedRunner
from fusegen.runtime.scheduler import Scheduler, TableUpdate
from fusegen.runtime.speculative import NgramProposer, rejection_sample, split_entries

BLOCK = 4
NEW = 12


@pytest.fixture(scope="module")
def compiled():
    models = {}

    def get(family: str, seed: int = 0):
        if (family, seed) not in models:
            models[family, seed] = fusegen.compile(mini_model(family, seed=seed), f"block_size={BLOCK}")
        return models[family, seed]
    return get


def with_config(model, text: str):
    """The same compiled graph under another config (speculation is an engine setting)."""
    config = fusegen.CompileConfig.from_string(f"block_size={BLOCK},{text}")
    return fusegen.CompiledModel(model.graph_module, dataclasses.replace(model.report, config=config), model.facts)


def engine(compiled_model, num_blocks=64, proposer=None, **kwargs):
    runner = PagedRunner(compiled_model.graph_module, compiled_model.facts["kv"], num_blocks, "cpu")
    return Engine(runner, eos_token_ids=[], proposer=proposer, **kwargs)


def draft_proposer(compiled_model, k=3, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64):
    runner = PagedRunner(compiled_model.graph_module, compiled_model.facts["kv"], num_blocks, "cpu")
    return DraftProposer(runner, k, max_num_seqs, 256, max_num_batched_tokens)


def prompts(seed=0):
    """Repetitive prompts (prompt lookup finds matches), random ones, a one-token one."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()   # noqa: E731
    segment = rand(5)
    return [segment * 3, rand(9), rand(3) + segment * 2 + rand(2) + segment[:3], [7], rand(16)]


class Scripted:
    """Proposes the reference continuation, with the token at index ``wrong`` of each
    proposal changed (so that it and the rest are rejected): rollback on demand. With
    ``vary``, request r's proposals go wrong at index r % (k + 1) (k + 1: never), so the
    sequences of one step accept different numbers of tokens."""

    overlaps = True

    def __init__(self, references: dict, k: int = 4, wrong: int | None = None, vary: bool = False):
        self.references, self.k, self.wrong, self.vary = references, k, wrong, vary

    def propose(self, requests, caps):
        out = []
        for req, cap in zip(requests, caps):
            ref = self.references[tuple(req.prompt)]
            done = len(req.tokens) - len(req.prompt) + req.num_pending
            proposal = ref[done:done + min(cap, self.k)]
            wrong = req.request_id % (self.k + 1) if self.vary else self.wrong
            if wrong is not None and wrong < len(proposal):
                proposal[wrong] = (proposal[wrong] + 1) % VOCAB
            out.append(proposal)
        return out


def run_events(eng, requests):
    """Drive ``eng`` over (prompt, max_new, sampling) requests added up front: the tokens of
    each, and the events of every step."""
    ids = [eng.add_request(p, n, **s) for p, n, s in requests]
    got, steps = defaultdict(list), []
    while eng.has_unfinished():
        events = eng.step()
        steps.append(events)
        for event in events:
            got[event.request_id].append(event.token)
    return [got[i] for i in ids], steps


# --- pieces ---------------------------------------------------------------------------------

def test_prompt_lookup_proposes_what_followed_the_latest_earlier_match():
    ngram = NgramProposer(k=3, n=3)
    tokens = [5, 7, 1, 2, 3, 9, 4, 8, 1, 2, 3]
    assert ngram.propose_one(tokens, 0, 3) == [9, 4, 8]
    assert ngram.propose_one(tokens, 0, 2) == [9, 4]
    assert ngram.propose_one([1, 2, 3, 0, 1, 2, 3, 6, 1, 2, 3], 0, 3) == [6, 1, 2]   # the latest match
    assert ngram.propose_one([4, 1, 2, 3, 5], 0, 3) == []                        # no earlier (2 3 5)
    # the last token pending: matched on the known tokens, the match's next token stands in for it
    assert ngram.propose_one([1, 2, 3, 9, 4, 8, 1, 2, 3], 1, 3) == [4, 8, 1]


def test_split_entries_gives_every_verified_position_its_own_logits_row():
    entries = [[0, 3, 5], [9, 4, 0], [3, 1, 7], [1, 1, 0]]
    split, offsets = split_entries(entries, [[11, 12], [], []])
    assert split == [[0, 0, 0, 3, 5], [9, 10, 11, 4, 0], [1, 1, 1, 1, 7], [1, 1, 1, 1, 0]]
    assert offsets == [0, 3, 4]
    with pytest.raises(ValueError, match="speculating entry"):
        split_entries([[0], [9], [2], [1]], [[11, 12]])


def test_rejection_sampling_follows_the_target_exactly():
    """Enumerate d ~ q and a grid of both uniforms: the output distribution is p."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    grid = (torch.arange(100) + 0.5) / 100
    ua, ud = torch.meshgrid(grid, grid, indexing="ij")
    ua, ud = ua.flatten(), ud.flatten()
    out = torch.zeros(4)
    for d in range(4):
        tokens = rejection_sample(p.expand(len(ua), 4), q.expand(len(ua), 4), torch.full((len(ua),), d), ua, ud)
        out += q[d] * torch.bincount(tokens, minlength=4) / len(ua)
    assert torch.allclose(out, p, atol=0.011), out


def test_rollback_frees_exactly_the_blocks_past_the_kept_tokens():
    """Scheduler + KV manager, no model: exact block ids through a verification."""
    class Fixed:
        overlaps, k = True, 4

        def propose(self, requests, caps):
            return [[7, 7, 7, 7][:c] for c in caps]

    kv = KVCacheManager(8, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(kv, 64, 4, proposer=Fixed())
    req = sched.add([1, 2, 3, 4, 5], 10)
    plan = sched.schedule()
    assert plan.counts == [5] and plan.proposals == [[]] and kv.blocks(0) == [0, 1]
    sched.update(plan, [9])
    plan = sched.schedule()                    # token 9 at position 5, then 7 7 7 7 at 6..9
    assert plan.counts == [5] and plan.starts == [5] and plan.proposals == [[7, 7, 7, 7]]
    assert kv.blocks(0) == [0, 1, 2] and plan.tables == [TableUpdate(0, 2, [2])]
    events = sched.update(plan, [[7, 8]])      # one accepted, 8 instead of the second
    assert [e.token for e in events] == [7, 8] and req.output == [9, 7, 8]
    assert req.num_computed == 7 and kv.blocks(0) == [0, 1] and kv.pool.num_free == 6
    assert sched.stats["blocks_rolled_back"] == 1
    plan = sched.schedule()                    # position 7, proposals at 8..11: the block comes back
    assert plan.starts == [7] and plan.counts == [5] and kv.blocks(0) == [0, 1, 3]
    assert plan.tables == [TableUpdate(0, 2, [3])]      # column 2 again, the next free block
    with pytest.raises(ValueError, match=r"accepted prefix"):
        sched.update(plan, [[9, 9]])
    sched.update(plan, [[7, 7, 7, 7, 1]])      # all accepted, plus the bonus token
    assert req.num_computed == 12 and kv.blocks(0) == [0, 1, 3] and req.output == [9, 7, 8, 7, 7, 7, 7, 1]
    plan = sched.schedule()                    # max_new_tokens 10: 2 left, so one proposal
    assert plan.proposals == [[7]]
    sched.update(plan, [[7, 2]])
    assert req.finish_reason == "length" and len(req.output) == 10 and kv.pool.num_free == 8


# --- the engine -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_plain_decodings_on_every_family(compiled, family):
    """Prompt lookup (whatever it finds), then proposals that go wrong at a different place
    for each request: sequences accepting 0..4 tokens in one step, chunked prefills beside."""
    model = compiled(family)
    batch = prompts()
    plain = engine(model, max_num_batched_tokens=16).generate_batch(batch, NEW)
    eng = engine(model, proposer=NgramProposer(k=4, n=2), max_num_batched_tokens=16)
    assert eng.generate_batch(batch, NEW) == plain
    assert eng.kv.pool.num_free == 64
    eng = engine(model, proposer=Scripted({tuple(p): r for p, r in zip(batch, plain)}, k=4, vary=True),
                 max_num_batched_tokens=16)
    out, steps = run_events(eng, [(p, NEW, {}) for p in batch])
    assert out == plain
    assert 0 < eng.stats["spec_accepted"] < eng.stats["spec_proposed"]
    per_step = [sorted(Counter(e.request_id for e in events).values()) for events in steps]
    assert any(len(set(counts)) > 1 for counts in per_step)   # different acceptance in one step
    assert eng.kv.pool.num_free == 64


def test_prompt_lookup_gets_tokens_accepted_on_a_repetitive_prompt(compiled):
    model = compiled("llama")
    prompt = prompts()[0] * 2
    plain = engine(model).generate_batch([prompt], 24)
    eng = engine(model, proposer=NgramProposer(k=4, n=3))
    assert eng.generate_batch([prompt], 24) == plain
    per_step = [r.accepted for r in eng.step_log]
    assert sum(per_step) == eng.stats["spec_accepted"] > 0
    assert sum(r.proposed for r in eng.step_log) == eng.stats["spec_proposed"]
    assert len(eng.step_log) < 24             # more than one token in some steps


def test_draft_model_greedy_output_is_plain_and_the_target_as_its_own_draft_accepts_all(compiled):
    target, other = compiled("llama"), compiled("llama", seed=1)
    speculative = with_config(target, "speculative=draft,spec_k=3")
    plain = engine(target).generate_batch(prompts(), NEW)
    eng = speculative.engine(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, draft=other)
    assert eng.generate_batch(prompts(), NEW) == plain
    assert eng.stats["spec_proposed"] > 0
    assert eng.kv.pool.num_free == 64 and eng.proposer.kv.pool.num_free == eng.proposer.kv.num_blocks
    own = speculative.engine(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, draft=target)
    assert own.generate_batch(prompts(), NEW) == plain
    assert own.stats["spec_accepted"] == own.stats["spec_proposed"] > 0


def test_blocks_per_sequence_follow_the_kept_tokens_after_each_rejection(compiled):
    model = compiled("llama")
    batch = prompts()[:3]
    plain = engine(model).generate_batch(batch, NEW)
    refs = {tuple(p): r for p, r in zip(batch, plain)}
    eng = engine(model, num_blocks=40, proposer=Scripted(refs, k=4, wrong=2), overlap=False,
                 enable_prefix_caching=False)
    ids = [eng.add_request(p, NEW) for p in batch]
    got = defaultdict(list)
    while eng.has_unfinished():
        for event in eng.step():
            got[event.request_id].append(event.token)
        held = 0
        for req in eng.scheduler.running:
            assert len(eng.kv.blocks(req.request_id)) == -(-req.num_computed // BLOCK)
            held += len(eng.kv.blocks(req.request_id))
        assert eng.kv.pool.num_free == 40 - held
    assert [got[i] for i in ids] == plain
    assert eng.stats["blocks_rolled_back"] > 0
    assert 0 < eng.stats["spec_accepted"] < eng.stats["spec_proposed"]
    assert eng.kv.pool.num_free == 40


@pytest.mark.parametrize("max_new", [1, 2, 3, 7])
def test_max_new_tokens_is_never_exceeded_inside_an_accepted_run(compiled, max_new):
    model = compiled("llama")
    batch = prompts()
    plain = engine(model).generate_batch(batch, NEW)
    refs = {tuple(p): r for p, r in zip(batch, plain)}
    eng = engine(model, proposer=Scripted(refs, k=4))
    assert eng.generate_batch(batch, max_new) == [r[:max_new] for r in plain]


def test_eos_inside_an_accepted_run_ends_the_request_there_and_streams_several_tokens_a_step(compiled):
    model = compiled("llama")
    prompt = prompts()[1]
    ref = engine(model).generate_batch([prompt], NEW)[0]
    eos = ref[6]
    stop = ref.index(eos)
    eng = engine(model, proposer=Scripted({tuple(prompt): ref}, k=4))
    out, steps = run_events(eng, [(prompt, NEW, {})])
    assert out == [ref]
    assert max(len(events) for events in steps) > 1       # one step, several tokens of one request
    eng = engine(model, proposer=Scripted({tuple(prompt): ref}, k=4))
    assert eng.generate_batch([prompt], NEW, eos_token_ids=[eos]) == [ref[:stop + 1]]
    assert eng.kv.pool.num_free == 64
    assert list(engine(model, proposer=Scripted({tuple(prompt): ref}, k=4)).stream(prompt, NEW)) == ref


def test_prefix_caching_with_speculation(compiled):
    model = compiled("qwen2")
    shared = prompts()[0]
    batch = [shared + [9, 4], shared + [11]]
    plain = [engine(model).generate_batch([p], NEW)[0] for p in batch]
    eng = engine(model, proposer=NgramProposer(k=4, n=2))
    assert [eng.generate_batch([p], NEW)[0] for p in batch] == plain
    assert eng.stats["prefix_hit_blocks"] > 0 and eng.stats["spec_accepted"] > 0
    assert eng.kv.pool.num_free == 64


def test_log_probs_of_speculated_tokens_are_the_plain_ones(compiled):
    model = compiled("llama")
    prompt = prompts()[0]
    ref = engine(model).generate_batch([prompt], NEW)[0]

    def logprobs(eng):
        eng.add_request(prompt, NEW, logprobs=2)
        out = []
        while eng.has_unfinished():
            out += [(e.token, e.logprob.logprob, e.logprob.top) for e in eng.step()]
        return out
    plain = logprobs(engine(model))
    eng = engine(model, proposer=Scripted({tuple(prompt): ref}, k=3, wrong=2))
    spec = logprobs(eng)
    assert eng.stats["spec_accepted"] > 0
    assert [t for t, *_ in spec] == [t for t, *_ in plain] == ref
    for (_, lp, top), (_, lp_ref, top_ref) in zip(spec, plain):
        assert lp == pytest.approx(lp_ref, abs=1e-4)
        assert [i for i, _ in top] == [i for i, _ in top_ref]


def test_soak_speculation_preemption_random_lengths_no_leaks(compiled):
    """A small pool (preemption), a small budget (chunked prefill), random prompt lengths
    (some repetitive) and budgets, greedy and seeded requests, both proposers: greedy
    outputs are plain decoding's, seeded ones too with prompt lookup; nothing leaks."""
    model, other = compiled("llama"), compiled("llama", seed=1)
    rng = random.Random(0)
    requests = []
    for i in range(14):
        n = rng.randint(1, 20)
        prompt = [rng.randrange(3, VOCAB) for _ in range(n)]
        if i % 2:
            prompt = (prompt[:4] * 5)[:n + 8]
        sampling = dict(temperature=0.8, seed=i) if i % 3 == 0 else {}
        requests.append((prompt, rng.randint(1, 16), sampling))
    plain, _ = run_events(engine(model, num_blocks=200), requests)
    for proposer in (NgramProposer(k=4, n=2), draft_proposer(other, k=3), draft_proposer(model, k=4)):
        eng = engine(model, num_blocks=14, proposer=proposer, max_num_batched_tokens=12, max_num_seqs=6)
        out, _ = run_events(eng, requests)
        greedy = [i for i, (*_, s) in enumerate(requests) if not s]
        assert [out[i] for i in greedy] == [plain[i] for i in greedy]
        if isinstance(proposer, NgramProposer):
            assert out == plain
        assert all(len(o) == n for o, (_, n, _) in zip(out, requests))
        assert eng.stats["preemptions"] > 0 and eng.stats["spec_proposed"] > 0
        assert eng.kv.pool.num_free == 14 and eng._rows == {}
        if isinstance(proposer, DraftProposer):
            assert proposer.kv.pool.num_free == proposer.kv.num_blocks and not proposer._drafts


# --- sampling: the distribution ---------------------------------------------------------------

def tiny_llama(seed: int, scale: float):
    """A one-layer Llama over 8 tokens; ``scale`` on the LM head sharpens its distributions
    (a draft far from the target makes a wrong acceptance rule visible)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8,             # 32000
                         hidden_size=32,           # 4096
                         intermediate_size=64,     # 11008
                         num_hidden_layers=1,      # 32
                         num_attention_heads=2,    # 32
                         num_key_value_heads=1,    # 32
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return fusegen.compile(model, f"block_size={BLOCK}")


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(0, 3.0), tiny_llama(1, 8.0)


def chi_square(a: list, b: list, min_count: int = 10) -> tuple[float, float]:
    """Two-sample chi-square homogeneity statistic of equal-sized samples ``a`` and ``b``
    over their categories (those with fewer than ``min_count`` draws pooled into one), and
    the critical value at significance 0.001 (Wilson-Hilferty: chi2_df(1 - alpha) ~
    df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3, z = 3.0902)."""
    A, B = Counter(a), Counter(b)
    assert len(a) == len(b)
    stat, cells, pooled = 0.0, 0, [0, 0]
    for key in set(A) | set(B):
        if A[key] + B[key] >= min_count:
            stat += (A[key] - B[key]) ** 2 / (A[key] + B[key])
            cells += 1
        else:
            pooled[0] += A[key]
            pooled[1] += B[key]
    if sum(pooled):
        stat += (pooled[0] - pooled[1]) ** 2 / sum(pooled)
        cells += 1
    df = cells - 1
    return stat, df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3


DRAWS = 800
PROMPT = [1, 3, 5, 7, 3, 5, 1, 6, 3]


def sampled(model, proposer, seeds, max_new=4):
    runner = PagedRunner(model.graph_module, model.facts["kv"], 1300, "cpu")
    eng = Engine(runner, eos_token_ids=[], max_num_batched_tokens=2048, max_num_seqs=256, proposer=proposer)
    out, _ = run_events(eng, [(PROMPT, max_new, dict(temperature=1.0, seed=s)) for s in seeds])
    return out, eng.stats


def assert_same_distribution(plain, spec):
    """The tokens after the first (the prefill's) as pairs (2nd, 3rd), and the 4th."""
    for part in (lambda o: tuple(o[1:3]), lambda o: o[3]):
        stat, critical = chi_square([part(o) for o in plain], [part(o) for o in spec])
        assert stat < critical, (stat, critical)


def assert_different_distribution(plain, spec):
    stats = [chi_square([part(o) for o in plain], [part(o) for o in spec])
             for part in (lambda o: tuple(o[1:3]), lambda o: o[3])]
    assert any(stat > critical for stat, critical in stats), stats


@pytest.fixture(scope="module")
def plain_draws(tiny):
    return sampled(tiny[0], None, range(DRAWS))[0]


def test_seeded_prompt_lookup_sampling_matches_plain_sampling(tiny, plain_draws, monkeypatch):
    target, _ = tiny
    same, stats = sampled(target, NgramProposer(k=3, n=1), range(DRAWS))
    assert same == plain_draws                 # one draw per position: the same tokens for a seed
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    spec, _ = sampled(target, NgramProposer(k=3, n=1), range(DRAWS, 2 * DRAWS))   # independent seeds
    assert_same_distribution(plain_draws, spec)
    monkeypatch.setattr(engine_module, "accepted_prefix", lambda proposal, chosen: len(proposal))
    wrong, stats = sampled(target, NgramProposer(k=3, n=1), range(DRAWS, 2 * DRAWS))
    assert stats["spec_accepted"] == stats["spec_proposed"] > 0
    assert_different_distribution(plain_draws, wrong)


def test_draft_model_sampling_matches_plain_sampling(tiny, plain_draws, monkeypatch):
    target, other = tiny

    def proposer():
        runner = PagedRunner(other.graph_module, other.facts["kv"], 1300, "cpu")
        return DraftProposer(runner, 3, 256, 64, 2048)
    spec, stats = sampled(target, proposer(), range(DRAWS, 2 * DRAWS))
    assert 0 < stats["spec_accepted"] < stats["spec_proposed"]
    assert_same_distribution(plain_draws, spec)
    monkeypatch.setattr(engine_module, "rejection_sample", lambda p, q, proposed, ua, ud: proposed)
    wrong, stats = sampled(target, proposer(), range(DRAWS, 2 * DRAWS))
    assert stats["spec_accepted"] == stats["spec_proposed"]
    assert_different_distribution(plain_draws, wrong)


# --- configuration ----------------------------------------------------------------------------

def test_config_fields_and_their_errors(compiled, tiny):
    config = fusegen.CompileConfig.from_string("speculative=ngram,spec_k=6,spec_ngram=2")
    assert (config.speculative, config.spec_k, config.spec_ngram) == ("ngram", 6, 2)
    assert fusegen.CompileConfig.from_string(str(config)) == config
    for text, message in [("speculative=medusa", "speculative must be one of"),
                          ("speculative=ngram,spec_k=0", "spec_k must be in 1..16"),
                          ("speculative=ngram,spec_ngram=0", "spec_ngram must be >= 1"),
                          ("spec_draft=/models/small", "only used with speculative=draft"),
                          ("preset=dense_kv,speculative=ngram", "needs paged_kv")]:
        with pytest.raises(ConfigError, match=message):
            fusegen.CompileConfig.from_string(text)
    model = with_config(compiled("llama"), "speculative=draft")
    with pytest.raises(ConfigError, match="needs spec_draft=PATH"):
        model.engine(num_blocks=16)
    with pytest.raises(ConfigError, match="vocabulary of 8, the target .* 128"):
        model.engine(num_blocks=16, draft=tiny[0])
    with pytest.raises(ValueError, match="needs speculative=draft"):
        compiled("llama").engine(num_blocks=16, draft=tiny[0])
    eng = with_config(compiled("llama"), "speculative=ngram,spec_k=2").engine(num_blocks=16)
    assert isinstance(eng.proposer, NgramProposer) and eng.proposer.k == 2
