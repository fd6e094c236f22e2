"""Bad requests never poison the engine, concurrent consumers get exactly their own tokens,
and a step that raises takes down only its own requests (CPU, a compiled mini Llama)."""

import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusegen
from families import VOCAB, mini_model
from fusegen.errors import RequestFailedError

NEW = 6


@pytest.fixture(scope="module")
def compiled():
    return fusegen.compile(mini_model("llama"), "block_size=4")


def fresh(compiled, **kwargs):
    kwargs.setdefault("num_blocks", 64)
    return compiled.engine(**kwargs)


def solo(compiled, prompt, new=NEW, **sampling):
    return fresh(compiled).generate_batch([prompt], new, eos_token_ids=[], **sampling)[0]


def leak_free(engine):
    pool = engine.kv.pool
    return (not engine.has_unfinished() and pool.num_free == pool.num_blocks and engine._rows == {}
            and engine._outputs == {} and all(pool.ref_count(b) == 0 for b in range(pool.num_blocks)))


# --- validation at the door --------------------------------------------------------------

def test_an_out_of_vocabulary_token_is_refused_and_the_shared_engine_stays_usable(compiled):
    with pytest.raises(ValueError, match=rf"prompts\[0\]\[1\] = {VOCAB} is not a token id of this "
                                         rf"model \(vocabulary of {VOCAB}\)"):
        compiled.generate_batch([[5, VOCAB]], 3)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\] = -1"):
        compiled.generate_batch([[-1]], 3)
    assert not compiled._engine.has_unfinished()
    assert compiled.generate_batch([[5, 6]], 3) == [solo(compiled, [5, 6], 3)]
    assert leak_free(compiled._engine)


def test_a_batch_is_accepted_whole_or_not_at_all(compiled):
    engine = fresh(compiled)
    with pytest.raises(ValueError, match=r"exceeds max_model_len|needs \d+ blocks"):
        engine.generate_batch([[5, 6], [5] * 300], 3)
    with pytest.raises(ValueError, match=r"prompts\[1\] needs at least one token"):
        engine.generate_batch([[5, 6], []], 3)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        engine.generate_batch([], 3)
    assert not engine.has_unfinished() and engine.scheduler._next_id == 0


@pytest.mark.parametrize("sampling, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, got nan"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
])
def test_bad_sampling_values_are_refused(compiled, sampling, message):
    engine = fresh(compiled)
    with pytest.raises(ValueError, match=message):
        engine.generate_batch([[5, 6]], 3, **sampling)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("new, message", [(0, "max_new_tokens must be >= 1, got 0"),
                                          (2.0, "max_new_tokens must be an integer >= 1, got 2.0"),
                                          (True, "max_new_tokens must be an integer")])
def test_a_stream_with_a_bad_length_raises_when_it_is_made(compiled, new, message):
    engine = fresh(compiled)
    with pytest.raises(ValueError, match=message):
        engine.stream([5, 6], new)          # not at the first next()
    assert not engine.has_unfinished()


def test_generate_checks_its_tensors(compiled):
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="input_ids must hold integers, got torch.float32"):
        compiled.generate(ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        compiled(ids.float())
    with pytest.raises(ValueError, match=rf"input_ids holds {VOCAB}, not a token id"):
        compiled.generate(torch.full((1, 3), VOCAB), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids is empty: shape \(0, 5\)"):
        compiled.generate(torch.zeros(0, 5, dtype=torch.long), max_new_tokens=2)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask row 0 is not left-padded"):
        compiled.generate(ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask row 0 is not left-padded"):
        compiled(ids, attention_mask=right)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        compiled(ids, attention_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match=r"temperature must be > 0 when do_sample=True, got 0"):
        compiled.generate(ids, max_new_tokens=2, do_sample=True, temperature=0)


# --- exact consumers ---------------------------------------------------------------------

def test_interleaved_streams_each_get_exactly_their_own_tokens(compiled):
    a, b = [5, 9, 33, 2], [7, 3, 64]
    want_a, want_b = solo(compiled, a), solo(compiled, b)
    engine = fresh(compiled)
    sa = engine.stream(a, NEW, eos_token_ids=[])
    sb = engine.stream(b, NEW, eos_token_ids=[])
    got_a, got_b = [], []
    for _ in range(NEW):
        got_a.append(next(sa))
        got_b.append(next(sb))
    assert (got_a, got_b) == (want_a, want_b)
    assert list(sa) == [] and list(sb) == []      # both end, nothing spins
    assert leak_free(engine)


def test_a_stream_paused_across_a_batch_loses_nothing(compiled):
    a, others = [5, 9, 33, 2], [[7, 3, 64], [12, 13]]
    engine = fresh(compiled)
    stream = engine.stream(a, NEW, eos_token_ids=[])
    first = next(stream)
    batch = engine.generate_batch(others, NEW, eos_token_ids=[])   # drives every step meanwhile
    assert batch == [solo(compiled, p) for p in others]
    assert [first] + list(stream) == solo(compiled, a)
    assert leak_free(engine)


def test_threads_sharing_one_engine_get_what_each_would_get_alone(compiled):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 12))] for _ in range(12)]
    want = [solo(compiled, p) for p in prompts]
    engine = fresh(compiled, max_num_seqs=4, max_num_batched_tokens=16)
    got = [None] * len(prompts)

    def worker(i):
        if i % 3 == 0:
            got[i] = list(engine.stream(prompts[i], NEW, eos_token_ids=[]))
        else:
            got[i] = engine.generate_batch([prompts[i]], NEW, eos_token_ids=[])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert got == want and leak_free(engine)


# --- fault isolation ---------------------------------------------------------------------

class Faults:
    """Makes chosen calls of a method raise, to inject faults into engine steps."""

    def __init__(self, obj, name, fail_on):
        self.calls, self.fail_on, self.inner = 0, fail_on, getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on(self.calls):
            raise RuntimeError(f"injected fault in call {self.calls}")
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("where", ["forward", "sample"])
def test_a_raising_step_fails_its_requests_and_the_engine_serves_on(compiled, where):
    engine = fresh(compiled)
    target = (engine.runner, "forward") if where == "forward" else (engine, "_choose")
    Faults(*target, fail_on=lambda n: n == 2)
    stream = engine.stream([5, 9, 33], NEW, eos_token_ids=[])
    assert next(stream) == solo(compiled, [5, 9, 33])[0]
    with pytest.raises(RequestFailedError, match=r"request 0 failed in an engine step: RuntimeError: "
                                                 r"injected fault in call 2"):
        next(stream)
    assert engine.stats["failed_steps"] == 1 and engine.stats["failed_requests"] == 1
    assert engine.generate_batch([[7, 3]], NEW, eos_token_ids=[]) == [solo(compiled, [7, 3])]
    assert leak_free(engine)


def test_soak_with_invalid_requests_and_injected_faults(compiled):
    """5,000 requests through one engine with a small pool (preemption): 5% invalid, 1% of
    forwards and 0.5% of samplings raising, 2% consumed by streams closed after one token.
    Every valid request that no fault hit equals its solo run; every invalid one got its
    error; nothing leaks."""
    rng = random.Random(0)
    distinct = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 14))] for _ in range(60)]
    solo_engine = fresh(compiled)
    alone = {tuple(p): solo_engine.generate_batch([p], NEW, eos_token_ids=[])[0] for p in distinct}
    engine = fresh(compiled, num_blocks=24, max_num_seqs=8, max_num_batched_tokens=24)
    Faults(engine.runner, "forward", fail_on=lambda n: rng.random() < 0.01)
    Faults(engine, "_choose", fail_on=lambda n: rng.random() < 0.005)
    invalid = closed = 0
    wanted, outputs = {}, {}
    start = time.perf_counter()
    for i in range(5000):
        roll = rng.random()
        if roll < 0.05:
            invalid += 1
            bad = rng.choice([[VOCAB + 1], [], [1.5], "text", [3] * 120])
            with pytest.raises(ValueError):
                engine.add_request(bad, NEW, eos_token_ids=[])
        elif roll < 0.07:
            stream = engine.stream(rng.choice(distinct), NEW, eos_token_ids=[])
            try:
                next(stream)                               # drives steps itself
            except RequestFailedError:
                pass
            stream.close()                                 # the consumer goes away
            closed += 1
        else:
            prompt = rng.choice(distinct)
            rid = engine.add_request(prompt, NEW, eos_token_ids=[])
            wanted[rid], outputs[rid] = alone[tuple(prompt)], []
        if i % 4 == 3:
            for rid, token, *_ in engine.step():
                outputs.setdefault(rid, []).append(token)
    while engine.has_unfinished():
        for rid, token, *_ in engine.step():
            outputs.setdefault(rid, []).append(token)
    failed = {rid for rid, _ in engine.failures}
    checked = [rid for rid in wanted if rid not in failed]
    print(f"soak: 5000 requests: {invalid} invalid (all rejected), {closed} streams closed early, "
          f"{engine.stats['failed_steps']} steps faulted failing {engine.stats['failed_requests']} requests, "
          f"{len(checked)} compared with their solo run, {engine.stats['preemptions']} preemptions, "
          f"{time.perf_counter() - start:.1f} s")
    assert invalid > 150 and closed > 50
    assert engine.stats["failed_steps"] >= 10 and failed <= set(wanted)
    assert engine.stats["preemptions"] > 0
    for rid in checked:
        assert outputs[rid] == wanted[rid], f"request {rid}"
    assert leak_free(engine)


# --- fuzzing the request API -------------------------------------------------------------

nan, inf = float("nan"), float("inf")
junk = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=2),
                 st.integers(max_value=-1), st.integers(min_value=VOCAB))
BAD = {
    "prompt": st.one_of(st.just([]), st.text(max_size=3), st.none(), st.floats(),
                        st.lists(st.integers(0, VOCAB - 1), max_size=4).flatmap(
                            lambda ok: junk.map(lambda bad: ok + [bad]))),
    "new": st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.none(), st.booleans()),
    "temperature": st.one_of(st.floats(max_value=-1e-6), st.sampled_from([nan, inf, -inf]), st.text(max_size=1)),
    "top_p": st.one_of(st.floats(min_value=1.0001), st.floats(max_value=0.0), st.sampled_from([nan, inf])),
    "top_k": st.one_of(st.integers(max_value=-1), st.floats(), st.booleans()),
}


@st.composite
def requests(draw):
    """A valid request, or one with exactly one field made invalid."""
    req = dict(prompt=draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)),
               new=draw(st.integers(1, 6)), temperature=draw(st.sampled_from([0.0, 0.7, 1.3])),
               top_p=draw(st.sampled_from([1.0, 0.9, 0.3])), top_k=draw(st.integers(0, 8)))
    broken = draw(st.sampled_from([None, None, None, "prompt", "new", "temperature", "top_p", "top_k"]))
    if broken:
        req[broken] = draw(BAD[broken])
    return req, broken


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=requests())
def test_fuzz_a_request_gets_a_typed_error_or_a_correct_result(compiled, case):
    req, broken = case
    engine = fuzz_engine(compiled)
    args = dict(temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"], seed=1, eos_token_ids=[])
    try:
        out = engine.generate_batch([req["prompt"]], req["new"], **args)
    except ValueError:
        event(f"refused {broken}")
        assert broken is not None and not engine.has_unfinished()
        return
    event("generated")
    assert broken is None, f"invalid {broken}={req[broken]!r} was accepted"
    assert out == fresh(compiled).generate_batch([req["prompt"]], req["new"], **args)
    assert len(out[0]) == req["new"] and leak_free(engine)


_fuzz = {}


def fuzz_engine(compiled):
    if "engine" not in _fuzz:
        _fuzz["engine"] = fresh(compiled)
    return _fuzz["engine"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 4, 6])),
       dtype=st.sampled_from([torch.long, torch.long, torch.int32, torch.float32, torch.bool, torch.float16]),
       mask_kind=st.sampled_from(["none", "left", "left", "right", "zeros", "twos", "float"]),
       high=st.sampled_from([VOCAB, VOCAB, VOCAB, VOCAB + 5]))
def test_fuzz_generate_tensors(compiled, shape, dtype, mask_kind, high):
    g = torch.Generator().manual_seed(sum(shape))
    ids = torch.randint(0, high, shape, generator=g).to(dtype)
    B, S = shape
    masks = {"none": None, "left": torch.ones(B, S, dtype=torch.long), "right": torch.ones(B, S, dtype=torch.long),
             "zeros": torch.zeros(B, S, dtype=torch.long), "twos": torch.full((B, S), 2),
             "float": torch.ones(B, S)}
    mask = masks[mask_kind]
    if mask_kind == "left" and S > 1:
        mask[:, 0] = 0
    if mask_kind == "right" and S > 1:
        mask[:, -1] = 0
    try:
        out = compiled.generate(ids, attention_mask=mask, max_new_tokens=2)
    except ValueError:
        event("refused")
        return
    event("generated")
    valid = dtype in (torch.long, torch.int32) and B * S > 0 and int(ids.max()) < VOCAB \
        and (mask_kind in ("none", "left") or (mask_kind == "right" and S == 1))   # all ones
    assert valid, f"accepted {dtype} ids of shape {shape}, max {int(ids.max()) if ids.numel() else None}, mask {mask_kind}"
    assert out.shape == (B, S + 2) and out.dtype == ids.dtype and torch.equal(out[:, :S], ids)


def test_a_stream_closed_before_its_first_token_aborts_its_request(compiled):
    engine = fresh(compiled)
    stream = engine.stream([5, 9, 33], NEW, eos_token_ids=[])
    stream.close()
    assert list(stream) == [] and not engine.scheduler.requests
    while engine.has_unfinished():
        engine.step()
    assert leak_free(engine)


def test_aborting_a_request_ends_its_consumer_with_an_error(compiled):
    from fusegen.errors import RequestAbortedError

    engine = fresh(compiled)
    stream = engine.stream([5, 9, 33], NEW, eos_token_ids=[])
    first = next(stream)
    engine.abort(stream.request_id)
    with pytest.raises(RequestAbortedError, match="request 0 was aborted"):
        next(stream)
    assert [first] == solo(compiled, [5, 9, 33])[:1]
    while engine.has_unfinished():
        engine.step()
    assert leak_free(engine)


def test_an_interrupt_inside_a_step_leaves_the_engine_consistent(compiled):
    engine = fresh(compiled)
    inner, calls = engine.runner.forward, []

    def interrupt(*args, **kwargs):   # Ctrl-C during the third forward
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return inner(*args, **kwargs)

    engine.runner.forward = interrupt
    other = engine.add_request([7, 3, 64], NEW, eos_token_ids=[])
    with pytest.raises(KeyboardInterrupt):
        engine.generate_batch([[5, 9, 33]], NEW, eos_token_ids=[])
    assert engine.stats["failed_steps"] == 1 and other in {rid for rid, _ in engine.failures}
    assert engine.generate_batch([[12, 13]], NEW, eos_token_ids=[]) == [solo(compiled, [12, 13])]
    assert [event.request_id for event in engine.step()] == [other]    # its token from before, unclaimed till now
    assert leak_free(engine)
