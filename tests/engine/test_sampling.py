"""SamplingParams validation and the batched sampling step (on the GPU when there is one)."""

import math

import pytest
import torch

from loraplex.engine.sampling import SamplingParams, TokenLogprob, make_generator, sample


def draw(logits, params, generators=None):
    if isinstance(params, SamplingParams):
        params = [params] * logits.shape[0]
    return sample(logits, params, generators or [None] * logits.shape[0])


# ---------------------------------------------------------------------------- parameters


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.logprobs) == (16, 1.0, 1.0, 0, None)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "off"
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -1}, "temperature must be >= 0, got -1"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\] and at least 1.18e-38 \(fp32\), got 0"),
    ({"top_p": 1e-46}, r"top_p must be in \(0, 1\]"),  # > 0, but 0 in fp32
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k must be 0 .off. or an integer >= 1, got -2"),
    ({"top_k": 1.5}, "top_k"),
    ({"seed": 1.0}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"stop": ["ok", 3]}, "stop strings must be non-empty strings, got 3"),
    ({"stop": ["x"] * 17}, "at most 16"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"stop": ["x" * 257]}, "at most 256 characters long, got one of 257"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids may hold at most 1024 ids, got 1025"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": -1}, "logprobs must be an integer between 0 and 20, got -1"),
    ({"logprobs": 21}, "logprobs"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_token_ids_are_kept_as_a_set():
    """Checked for every generated token: a set, whatever collection the client gave."""
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == frozenset({3, 5})
    assert SamplingParams(top_p=torch.finfo(torch.float32).tiny).top_p > 0


def test_sample_checks_shapes(device):
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.zeros(5, device=device), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="one params and one generator per row"):
        sample(torch.zeros(2, 5, device=device), [SamplingParams()], [None, None])


def test_make_generator(device):
    assert make_generator(None, device) is None
    a, b = make_generator(7, device), make_generator(7, device)
    assert torch.equal(torch.rand(4, generator=a, device=device), torch.rand(4, generator=b, device=device))


# ---------------------------------------------------------------------------- greedy and masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(device, dtype):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tokens, logprobs = draw(logits, SamplingParams(temperature=0))
    assert tokens == logits.float().argmax(-1).tolist()
    assert logprobs == [None] * 6


def test_greedy_ties_take_lowest_index(device):
    logits = torch.zeros(2, 10, device=device)
    logits[0, [3, 7]] = 5.0
    logits[1, [2, 4, 9]] = 1.0
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-9)):
        assert draw(logits, params)[0] == [3, 2]


def test_top_k_1_and_tiny_top_p_are_greedy(device):
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(1)).to(device)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(top_k=1, temperature=1.5), SamplingParams(top_p=1e-6, temperature=3.0),
                   SamplingParams(top_k=1, top_p=0.5, seed=3)):
        gens = [make_generator(params.seed, device) for _ in range(32)]
        assert draw(logits, params, gens)[0] == greedy


def _counts(device, probs, params, n=4000):
    logits = torch.tensor(probs, device=device).log().expand(n, -1)
    tokens, _ = draw(logits, params)
    return torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()


def test_top_k_keeps_the_k_best(device):
    counts = _counts(device, [0.1, 0.3, 0.05, 0.35, 0.2], SamplingParams(top_k=2, temperature=2.0))
    assert counts[1] > 0 and counts[3] > 0
    assert counts[0] == counts[2] == counts[4] == 0


def test_top_p_keeps_smallest_nucleus(device):
    probs = [0.5, 0.3, 0.15, 0.05]
    c = _counts(device, probs, SamplingParams(top_p=0.75))
    assert c[0] > 0 and c[1] > 0 and c[2] == c[3] == 0
    c = _counts(device, probs, SamplingParams(top_p=0.85))
    assert min(c[:3]) > 0 and c[3] == 0
    # Nucleus probabilities are renormalised: 0.5 / 0.8 and 0.3 / 0.8 (4000 draws, ~5 sigma).
    c = _counts(device, probs, SamplingParams(top_p=0.75))
    assert abs(c[0] / 4000 - 0.625) < 0.04


def test_top_p_applies_after_top_k(device):
    # top_k=2 leaves [0.4, 0.3] -> renormalised [0.57, 0.43]; top_p=0.5 then keeps token 0
    # only. top-p alone on the full distribution would keep tokens 0 and 1.
    probs = [0.4, 0.3, 0.2, 0.1]
    assert _counts(device, probs, SamplingParams(top_k=2, top_p=0.5))[1:] == [0, 0, 0]
    assert _counts(device, probs, SamplingParams(top_p=0.5))[1] > 0


def test_temperature_sampling_follows_softmax(device):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits / temperature, -1)
        params = SamplingParams(temperature=temperature)
        counts = _counts(device, torch.softmax(logits, -1).tolist(), params, n=20000)
        freq = torch.tensor(counts, dtype=torch.float32) / 20000
        assert torch.allclose(freq, expected, atol=0.02), (temperature, freq, expected)


def test_tiny_temperature_is_greedy_not_nan(device):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(6)).to(device) * 30
    for temperature in (1e-38, 1e-60):  # overflows fp32 logits / rounds to 0 in fp32
        assert draw(logits, SamplingParams(temperature=temperature))[0] == logits.argmax(-1).tolist()


def test_mixed_batch_rows_follow_their_own_params(device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 64, generator=g).to(device)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-9),
              SamplingParams(temperature=0, logprobs=2)]
    tokens, logprobs = draw(logits, params)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs[:3] == [None] * 3 and logprobs[3].token_id == tokens[3]


# ---------------------------------------------------------------------------- randomness


def test_seeded_row_does_not_depend_on_batch(device):
    vocab, steps, seed = 1000, 6, 1234
    g = torch.Generator().manual_seed(3)
    step_logits = [torch.randn(5, vocab, generator=g).to(device) for _ in range(steps)]
    mine = SamplingParams(temperature=1.3, top_k=200, top_p=0.95, seed=seed)

    alone_gen = make_generator(seed, device)
    alone = [draw(lg[3:4], [mine], [alone_gen])[0][0] for lg in step_logits]

    # Row 3 of 5, beside another seeded row, a greedy row and unseeded rows.
    params = [SamplingParams(seed=99), SamplingParams(temperature=0), SamplingParams(temperature=0.7),
              mine, SamplingParams(top_p=0.5)]
    gens = [make_generator(p.seed, device) for p in params]
    batched = [draw(lg, params, gens)[0][3] for lg in step_logits]
    assert alone == batched
    assert len(set(alone)) > 1  # really sampled, not a constant


def test_same_seed_same_tokens_different_seed_differs(device):
    logits = torch.zeros(1, 5000, device=device)
    def run(seed):
        gen = make_generator(seed, device)
        return [draw(logits, [SamplingParams(seed=seed)], [gen])[0][0] for _ in range(5)]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_unseeded_rows_vary(device):
    logits = torch.zeros(64, 1000, device=device)
    tokens, _ = draw(logits, SamplingParams())
    assert len(set(tokens)) > 40
    assert tokens != draw(logits, SamplingParams())[0]


def test_masked_tokens_never_drawn_even_with_extreme_logits(device):
    logits = torch.full((256, 8), -1e4, device=device)
    logits[:, 5] = 0.0
    logits[:, 6] = -3.0
    tokens, _ = draw(logits, SamplingParams(top_k=2, temperature=100.0))
    assert set(tokens) <= {5, 6}


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_the_raw_log_softmax(device):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 40, generator=g) * 3).to(device, torch.float16)
    params = [SamplingParams(temperature=0.3, top_k=5, logprobs=4), SamplingParams(logprobs=0),
              SamplingParams(temperature=0, logprobs=20)]
    tokens, logprobs = draw(logits, params)
    reference = torch.log_softmax(logits.float(), -1).cpu()
    for row, (token, lp, p) in enumerate(zip(tokens, logprobs, params)):
        assert isinstance(lp, TokenLogprob) and lp.token_id == token
        assert lp.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        assert len(lp.top) == p.logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        want = reference[row].topk(p.logprobs)
        assert [t for t, _ in lp.top] == want.indices.tolist()
        assert values == pytest.approx(want.values.tolist(), abs=1e-5)
        assert all(isinstance(t, int) for t, _ in lp.top)
    assert logprobs[2].top[0] == (tokens[2], pytest.approx(logprobs[2].logprob))


def test_logprobs_only_for_rows_that_ask(device):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5)).to(device)
    params = [SamplingParams(), SamplingParams(logprobs=3), SamplingParams(temperature=0),
              SamplingParams(logprobs=1)]
    _, logprobs = draw(logits, params)
    assert logprobs[0] is None and logprobs[2] is None
    assert len(logprobs[1].top) == 3 and len(logprobs[3].top) == 1
