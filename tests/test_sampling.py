"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, per-request seeds."""

import pytest
import torch

from fusegen.runtime.sampling import SamplingParams, apply_repetition_penalty, sample

V = 50


def logits_batch(B=6, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(params: SamplingParams, n: int):
    return [params.generator("cpu") for _ in range(n)]


def test_greedy_is_argmax():
    logits = logits_batch()
    got = sample(logits, [SamplingParams()] * 6)
    assert torch.equal(got, logits.argmax(-1))
    assert got.dtype == torch.long


def test_top_k_one_and_temperature_near_zero_behave_like_greedy():
    logits = logits_batch(seed=1)
    want = logits.argmax(-1)
    assert torch.equal(sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 6), want)
    cold = SamplingParams(temperature=1e-4, seed=3)
    for _ in range(20):
        assert torch.equal(sample(logits, [cold] * 6, seeded(cold, 6)), want)


def test_top_k_never_samples_outside_the_k_largest():
    logits = logits_batch(seed=2)
    params = SamplingParams(temperature=2.0, top_k=5, seed=0)
    allowed = logits.topk(5, dim=-1).indices
    gens = seeded(params, 6)
    seen = set()
    for _ in range(300):
        got = sample(logits, [params] * 6, gens)
        assert (allowed == got[:, None]).any(-1).all()
        seen.update(got.tolist())
    assert len(seen) > 6     # it does sample, not just take the argmax


def test_top_p_keeps_the_smallest_head_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    gens = seeded(params, 1)
    draws = torch.cat([sample(logits, [params], gens) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}     # 0.5 < 0.75 <= 0.5 + 0.3
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.04
    tight = SamplingParams(temperature=1.0, top_p=0.1, seed=0)
    assert set(sample(logits.expand(200, 4), [tight] * 200).tolist()) == {0}


def test_same_seed_same_tokens_whatever_shares_the_batch():
    logits = logits_batch(B=4, seed=4)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone_gen = [mine.generator("cpu")]
    alone = [sample(logits[:1], [mine], alone_gen).item() for _ in range(30)]
    others = [SamplingParams(), SamplingParams(temperature=0.7, top_k=3, seed=9),
              SamplingParams(temperature=1.5)]
    gens = [mine.generator("cpu"), None, others[1].generator("cpu"), None]
    batched = [sample(logits, [mine] + others, gens)[0].item() for _ in range(30)]
    assert batched == alone
    assert len(set(alone)) > 1


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.8, seed=7)
    n = 20000
    draws = sample(logits.expand(n, 5), [params] * n, [params.generator("cpu")] * n)
    freq = torch.bincount(draws, minlength=5).float() / n
    want = (logits[0] / 0.8).softmax(-1)
    assert torch.allclose(freq, want, atol=0.01), f"{freq} vs {want}"


def test_repetition_penalty_follows_hf():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = logits_batch(B=3, seed=5)
    history = [[1, 2, 2, 7], [3], [4, 5]]
    got = apply_repetition_penalty(logits, history, [1.3, 1.0, 0.8])
    for row, (h, p) in enumerate(zip(history, [1.3, 1.0, 0.8])):
        want = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[row:row + 1].clone())
        assert torch.equal(got[row:row + 1], want)
    params = [SamplingParams(repetition_penalty=1e6)] * 3
    picked = sample(logits, params, history=history)
    assert all(t not in h or logits[i].max() < 0 for i, (t, h) in enumerate(zip(picked.tolist(), history)))
    with pytest.raises(ValueError, match="repetition_penalty needs the token history"):
        sample(logits, params)


def test_bad_params_raise_with_the_value():
    for kwargs, msg in [(dict(temperature=-1), "temperature must be >= 0, got -1"),
                        (dict(top_k=-2), "top_k must be >= 0, got -2"),
                        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                        (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=r"logits \(2, 50\) must be \[B, V\] with B = 3"):
        sample(logits_batch(B=2), [SamplingParams()] * 3)
