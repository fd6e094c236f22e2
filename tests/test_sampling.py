"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, counter-based seeds."""

import pytest
import torch

from fusegen.runtime.sampling import SamplingParams, SamplingRows, apply_repetition_penalty, sample, uniform

V = 50


def logits_batch(B=6, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def rows(params, positions=None):
    params = params if isinstance(params, list) else [params]
    return SamplingRows.from_params(params, positions or list(range(len(params))), "cpu")


def draws(logits, params, n):
    """``n`` draws of one row at positions 0..n-1 (one batch: a row per position)."""
    return sample(logits.expand(n, -1), rows([params] * n, list(range(n))))


def test_greedy_is_argmax():
    logits = logits_batch()
    got = sample(logits, rows([SamplingParams()] * 6))
    assert torch.equal(got, logits.argmax(-1))
    assert got.dtype == torch.long


def test_top_k_one_and_temperature_near_zero_behave_like_greedy():
    logits = logits_batch(seed=1)
    want = logits.argmax(-1)
    assert torch.equal(sample(logits, rows([SamplingParams(temperature=1.0, top_k=1)] * 6)), want)
    cold = SamplingParams(temperature=1e-4, seed=3)
    for pos in range(20):
        assert torch.equal(sample(logits, rows([cold] * 6, [pos] * 6)), want)


def test_top_k_never_samples_outside_the_k_largest():
    logits = logits_batch(seed=2)[:1]
    params = SamplingParams(temperature=2.0, top_k=5, seed=0)
    allowed = set(logits.topk(5, dim=-1).indices[0].tolist())
    got = set(draws(logits, params, 300).tolist())
    assert got <= allowed and len(got) == 5     # it does sample, not just take the argmax


def test_top_p_keeps_the_smallest_head_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    got = draws(logits, SamplingParams(temperature=1.0, top_p=0.75, seed=0), 4000)
    assert set(got.tolist()) == {0, 1}     # 0.5 < 0.75 <= 0.5 + 0.3
    assert abs((got == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.1, seed=0), 200).tolist()) == {0}


def test_same_seed_and_position_same_token_whatever_shares_the_batch():
    logits = logits_batch(B=4, seed=4)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    others = [SamplingParams(), SamplingParams(temperature=0.7, top_k=3, seed=9),
              SamplingParams(temperature=1.5, repetition_penalty=1.2, seed=5)]
    history, lengths = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]), torch.tensor([2, 2, 2, 1])
    alone = [sample(logits[:1], rows(mine, [p])).item() for p in range(40)]
    batched = [sample(logits, rows([mine] + others, [p, 3, 9, 1]), history, lengths)[0].item()
               for p in range(40)]
    assert batched == alone and len(set(alone)) > 1
    other_seed = [sample(logits[:1], rows(SamplingParams(temperature=1.0, top_p=0.9, seed=1235), [p])).item()
                  for p in range(40)]
    assert other_seed != alone


def test_uniform_is_a_pure_function_of_seed_and_counter_and_looks_uniform():
    seeds = torch.tensor([0, 1, -1, (1 << 62) + 7, -(1 << 63)])
    counters = torch.arange(5)
    u = uniform(seeds, counters)
    assert torch.equal(u, uniform(seeds.clone(), counters.clone()))
    assert ((u >= 0) & (u < 1)).all() and u.dtype == torch.float32
    many = uniform(torch.full((100000,), 42), torch.arange(100000))
    hist = torch.histc(many, bins=10, min=0, max=1) / many.numel()
    assert (hist - 0.1).abs().max() < 0.005
    high = uniform(torch.full((1000,), 42) + (torch.arange(1000) << 32), torch.zeros(1000, dtype=torch.long))
    assert high.unique().numel() > 990     # the seed's upper 32 bits matter too


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20000
    freq = torch.bincount(draws(logits, SamplingParams(temperature=0.8, seed=7), n), minlength=5).float() / n
    want = (logits[0] / 0.8).softmax(-1)
    assert torch.allclose(freq, want, atol=0.01), f"{freq} vs {want}"


def test_repetition_penalty_follows_hf():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = logits_batch(B=3, seed=5)
    history = [[1, 2, 2, 7], [3], [4, 5]]
    padded = torch.tensor([h + [0] * (4 - len(h)) for h in history])
    lengths = torch.tensor([len(h) for h in history])
    penalties = [1.3, 1.0, 0.8]
    got = apply_repetition_penalty(logits, torch.tensor(penalties), padded, lengths)
    for row, (h, p) in enumerate(zip(history, penalties)):
        want = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[row:row + 1].clone())
        assert torch.equal(got[row:row + 1], want)
    strong = rows([SamplingParams(repetition_penalty=1e6)] * 3)
    picked = sample(logits, strong, padded, lengths)
    assert all(t not in h or logits[i].max() < 0 for i, (t, h) in enumerate(zip(picked.tolist(), history)))
    with pytest.raises(ValueError, match="repetition_penalty needs the token history"):
        sample(logits, strong)


def test_bad_params_raise_with_the_value():
    for kwargs, msg in [(dict(temperature=-1), "temperature must be >= 0, got -1"),
                        (dict(top_k=-2), "top_k must be >= 0, got -2"),
                        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                        (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
                        (dict(seed=1 << 64), "seed must fit in 64 bits"),
                        (dict(top_k=1 << 63), "top_k must fit in 64 bits")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=r"logits \(2, 50\) must be \[B, V\] with B = 3"):
        sample(logits_batch(B=2), rows([SamplingParams()] * 3))


@pytest.mark.parametrize("chunks", [None, 4, 16, 60])
def test_greedy_tokens_is_argmax_with_ties_and_infinities(chunks):
    from fusegen.runtime.sampling import greedy_tokens

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 240, generator=g)
    logits[1, [7, 100, 200]] = 50.0          # ties across chunks: the first one wins
    logits[2, [130, 131]] = 50.0             # ties inside a chunk
    logits[3] = float("-inf")                # nothing finite: index 0, as argmax
    logits[4, 239] = float("inf")
    got = greedy_tokens(logits, chunks)
    assert torch.equal(got, logits.argmax(-1)), (got, logits.argmax(-1))


def test_greedy_tokens_refuses_a_chunking_that_does_not_divide():
    from fusegen.runtime.sampling import greedy_tokens

    with pytest.raises(ValueError, match="do not divide"):
        greedy_tokens(torch.randn(2, 10), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_greedy_tokens_matches_argmax_on_large_vocabularies():
    from fusegen.runtime.sampling import greedy_tokens

    for V in (32000, 128256, 151936, 50257):
        logits = torch.randn(64, V, device="cuda", dtype=torch.bfloat16)
        logits[0, [5, V - 1]] = 100.0
        assert torch.equal(greedy_tokens(logits), logits.argmax(-1)), V
