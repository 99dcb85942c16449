"""Logits processing in the batched sampler: each processor against transformers' own (or a
plain loop where transformers has none), the history's pending token read on the device, and
rows that ask for nothing drawn exactly as before."""

from __future__ import annotations

import pytest
import torch
from transformers import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                          RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

from loraplex.engine.engine import Engine, EngineConfig, RequestError
from loraplex.engine.request import Request
from loraplex.engine.sampling import (RowHistory, SamplingParams, apply_min_p, apply_token_bitmask,
                                      check_vocab, draw, make_generator, process_logits, sample)

VOCAB = 70  # not a multiple of 32: the bitmask's last word is partial


def random_logits(batch, vocab=VOCAB, seed=0, device="cpu", scale=3.0):
    return (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


def random_ids(n, seed, vocab=VOCAB):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(**kwargs):
    return SamplingParams(**{"temperature": 0, "max_tokens": 64, **kwargs})


# ---------------------------------------------------------------------------- logit_bias


def test_logit_bias_matches_sequence_bias(device):
    logits = random_logits(3, device=device)
    biases = [{4: 5.0, 60: -7.5, 69: 100.0}, {}, {0: -100.0, 33: 2.25}]
    params = [greedy(logit_bias=b) for b in biases]
    processed = process_logits(logits, params)
    for row, bias in enumerate(biases):
        expected = logits[row: row + 1].cpu()
        if bias:
            expected = SequenceBiasLogitsProcessor({(t,): v for t, v in bias.items()})(
                torch.zeros(1, 1, dtype=torch.long), expected)
        assert torch.equal(processed[row].cpu(), expected[0])
    tokens, _ = sample(logits, params, [None] * 3)
    assert tokens == processed.argmax(-1).tolist() and tokens[0] == 69


def test_logit_bias_outside_the_vocabulary_is_refused(device):
    check_vocab(SamplingParams(logit_bias={VOCAB - 1: 1.0}), VOCAB)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(size 70\): 70, 1000"):
        check_vocab(SamplingParams(logit_bias={1000: 1.0, 70: 2.0, 3: 1.0}), VOCAB)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # never reaches the device's indexing
        process_logits(random_logits(1, device=device), [greedy(logit_bias={VOCAB: 1.0})])


# ---------------------------------------------------------------------------- min_tokens


def min_new_tokens(logits, blocked, generated, min_tokens):
    return MinNewTokensLengthLogitsProcessor(0, min_tokens, sorted(blocked))(
        torch.zeros(1, generated, dtype=torch.long), logits.cpu().unsqueeze(0))[0]


def test_min_tokens_matches_min_new_tokens_counting_the_pending_token(device):
    eos = {2, 5}
    logits = random_logits(6, device=device)
    rows = [  # params, history, blocked tokens
        (greedy(min_tokens=3, stop_token_ids=[7, 500]), RowHistory([1, 2], [9, 9]), {2, 5, 7}),
        (greedy(min_tokens=3, stop_token_ids=[7]), RowHistory([1], [9, 9], pending=1, pending_row=0), set()),
        (greedy(min_tokens=3), RowHistory([1], [9], pending=1, pending_row=1), eos),
        (greedy(min_tokens=2, ignore_eos=True, stop_token_ids=[11]), RowHistory([1]), {11}),  # EOS: no end
        (greedy(min_tokens=4), RowHistory([1], [3, 3, 3, 3]), set()),
        (greedy(), RowHistory([1]), set()),
    ]
    params, history, _ = zip(*rows)
    pending = torch.tensor([4, 4], device=device)
    processed = process_logits(logits, params, history, pending_tokens=pending, eos_token_ids=eos)
    for row, (p, h, blocked) in enumerate(rows):
        generated = len(h.output_ids) + h.pending
        expected = logits[row].cpu()
        if blocked:
            expected = min_new_tokens(logits[row], blocked, generated, p.min_tokens)
        assert torch.equal(processed[row].cpu(), expected), row
        assert set(torch.nonzero(processed[row].isinf()).flatten().tolist()) == blocked


def test_min_tokens_keeps_greedy_off_eos_until_reached(device):
    logits = random_logits(1, device=device)
    eos = logits[0].argmax().item()
    params = [greedy(min_tokens=2)]
    for generated, want_eos in ((0, False), (1, False), (2, True)):
        history = [RowHistory([1], [3] * generated)]
        tokens, _ = sample(logits, params, [None], history=history, eos_token_ids={eos})
        assert (tokens[0] == eos) is want_eos


# ---------------------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers_over_prompt_output_and_pending(device):
    logits = random_logits(4, device=device)
    penalties = [1.3, 0.7, 1.0, 2.0]
    history = [RowHistory(random_ids(8, 1), random_ids(5, 2), pending=1, pending_row=2),
               RowHistory(random_ids(20, 3), []),
               RowHistory(random_ids(4, 4), random_ids(4, 5)),
               RowHistory([], random_ids(30, 6), pending=1, pending_row=0)]
    pending = torch.tensor([17, 0, 42], device=device)
    params = [greedy(repetition_penalty=p) for p in penalties]
    processed = process_logits(logits, params, history, pending_tokens=pending)
    pending_ids = {0: [42], 3: [17]}
    for row, (p, h) in enumerate(zip(penalties, history)):
        ids = torch.tensor([[*h.prompt_ids, *h.output_ids, *pending_ids.get(row, [])]])
        expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[row: row + 1].cpu().clone())[0]
        assert torch.equal(processed[row].cpu(), expected), row
    tokens, _ = sample(logits, params, [None] * 4, history=history, pending_tokens=pending)
    assert tokens == processed.argmax(-1).tolist()


def frequency_presence_reference(logits, output_ids, frequency, presence):
    """OpenAI's formula, one token at a time."""
    out = logits.cpu().clone()
    for token in set(output_ids):
        count = output_ids.count(token)
        out[token] -= frequency * count + presence * (count > 0)
    return out


def test_frequency_and_presence_penalties_count_the_output_and_its_pending_token(device):
    logits = random_logits(4, device=device)
    settings = [(0.5, 0.0), (0.0, 1.5), (-1.25, 2.0), (2.0, -0.5)]
    history = [RowHistory(random_ids(10, 7), random_ids(12, 8), pending=1, pending_row=1),
               RowHistory(random_ids(10, 9), random_ids(6, 10)),
               RowHistory([], random_ids(40, 11), pending=1, pending_row=0),
               RowHistory(random_ids(10, 12), [], pending=1, pending_row=1)]
    pending = torch.tensor([5, 66], device=device)  # row 1 of this tensor is pending twice
    params = [greedy(frequency_penalty=f, presence_penalty=p) for f, p in settings]
    processed = process_logits(logits, params, history, pending_tokens=pending)
    pending_ids = [[66], [], [5], [66]]
    for row, ((f, p), h) in enumerate(zip(settings, history)):
        expected = frequency_presence_reference(logits[row], [*h.output_ids, *pending_ids[row]], f, p)
        torch.testing.assert_close(processed[row].cpu(), expected, rtol=0, atol=1e-5)
    # the prompt is not penalized: a prompt-only token keeps its logit
    only_prompt = set(history[1].prompt_ids) - set(history[1].output_ids)
    assert all(processed[1, t] == logits[1, t] for t in only_prompt)


def test_all_processors_in_vllms_order(device):
    """bias, then min_tokens, then repetition, then frequency/presence, each on the result of
    the one before."""
    logits = random_logits(1, device=device)
    h = RowHistory(random_ids(6, 13), random_ids(6, 14))
    params = greedy(logit_bias={h.output_ids[0]: -3.0, 50: 4.0}, min_tokens=10, repetition_penalty=1.5,
                    frequency_penalty=0.4, presence_penalty=0.3, stop_token_ids=[8])
    processed = process_logits(logits, [params], [h], eos_token_ids={3})
    ref = logits.cpu().clone()
    sequence_bias = {(t,): v for t, v in params.logit_bias.items()}
    ref = SequenceBiasLogitsProcessor(sequence_bias)(torch.zeros(1, 1).long(), ref)
    ref = MinNewTokensLengthLogitsProcessor(0, 10, [3, 8])(torch.zeros(1, 6).long(), ref)
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[*h.prompt_ids, *h.output_ids]]), ref)
    ref = frequency_presence_reference(ref[0], list(h.output_ids), 0.4, 0.3)
    torch.testing.assert_close(processed[0].cpu(), ref, rtol=0, atol=1e-5)


def test_history_is_required_and_the_pending_token_must_be_given(device):
    logits = random_logits(1, device=device)
    with pytest.raises(ValueError, match="token history"):
        process_logits(logits, [greedy(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="token history"):
        process_logits(logits, [greedy(min_tokens=1)])
    with pytest.raises(RuntimeError, match="pending"):
        process_logits(logits, [greedy(presence_penalty=1.0)],
                       [RowHistory([1], [2], pending=1, pending_row=0)])


# ---------------------------------------------------------------------------- min_p


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_min_p_matches_min_p_warper_after_temperature(device, temperature):
    logits = random_logits(8, device=device)
    min_p = [0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0, 0.2]
    scaled = logits / temperature
    ours = apply_min_p(scaled, torch.tensor(min_p, device=device))
    for row, m in enumerate(min_p):
        expected = MinPLogitsWarper(m)(None, scaled[row: row + 1].cpu())[0] if m else scaled[row].cpu()
        assert torch.equal(ours[row].cpu(), expected), row

    # draw: every sampled token survives the warper on logits / temperature
    n = 512
    rows = logits[[3, 4]].repeat_interleave(n // 2, 0)
    params = [SamplingParams(temperature=temperature, min_p=0.3)] * (n // 2) + \
        [SamplingParams(temperature=temperature, min_p=0.5)] * (n // 2)
    tokens, _ = sample(rows, params, [None] * n)
    for i, token in enumerate(tokens):
        kept = MinPLogitsWarper(params[i].min_p)(None, (rows[i: i + 1] / temperature).cpu())[0]
        assert kept[token].isfinite()


def test_min_p_applies_after_temperature(device):
    # probabilities [0.5, 0.3, 0.2], min_p 0.5: at temperature 1 token 2 (0.2 < 0.25) is dropped;
    # at temperature 2 (probabilities ~ sqrt) it is kept
    logits = torch.tensor([0.5, 0.3, 0.2], device=device).log().expand(4000, -1)
    for temperature, token_2_drawn in ((1.0, False), (2.0, True)):
        tokens, _ = sample(logits, [SamplingParams(temperature=temperature, min_p=0.5)] * 4000, [None] * 4000)
        counts = torch.bincount(torch.tensor(tokens), minlength=3).tolist()
        assert counts[0] > 0 and counts[1] > 0 and (counts[2] > 0) is token_2_drawn, counts


# ---------------------------------------------------------------------------- bitmask


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, ceil(V / 32)] int32, bit j of word w = token 32 w + j (a loop)."""
    batch, vocab = allowed.shape
    words = [[0] * -(-vocab // 32) for _ in range(batch)]
    for b in range(batch):
        for t in range(vocab):
            if allowed[b, t]:
                words[b][t // 32] |= 1 << (t % 32)
    signed = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]  # as int32 holds them
    return torch.tensor(signed, dtype=torch.int32)


def test_bitmask_masks_exactly_the_disallowed_tokens(device):
    batch = 6
    allowed = torch.rand(batch, VOCAB, generator=torch.Generator().manual_seed(15)) < 0.3
    allowed[:, [0, 31, 32, 63, 69]] = True  # the sign bit and the partial last word
    allowed[4] = True                       # unconstrained: all -1 words (and the pad bits)
    bitmask = pack_bitmask(allowed)
    bitmask[4] = -1
    bitmask = bitmask.to(device)
    logits = random_logits(batch, device=device)
    masked = apply_token_bitmask(logits, bitmask)
    assert torch.equal(masked.isinf().cpu(), ~allowed)
    assert torch.equal(masked[allowed.to(device)], logits[allowed.to(device)])

    params = [greedy(), SamplingParams(temperature=1.5), greedy(logprobs=2), SamplingParams(seed=3, top_k=5),
              SamplingParams(), greedy(presence_penalty=1.0)]
    history = [RowHistory([1], random_ids(4, 16))] * batch
    for _ in range(20):
        gens = [make_generator(p.seed, device) for p in params]
        tokens, logprobs = sample(logits, params, gens, history=history, bitmask=bitmask)
        assert all(allowed[row, t] for row, t in enumerate(tokens))
        assert tokens[0] == masked[0].argmax().item() and tokens[2] == masked[2].argmax().item()
        # logprobs stay the model's: the raw log-softmax, not the masked one
        raw = torch.log_softmax(logits[2], -1)[tokens[2]].item()
        assert logprobs[2].logprob == pytest.approx(raw, abs=1e-6)


def test_bitmask_shape_is_checked(device):
    logits = random_logits(2, device=device)
    with pytest.raises(ValueError, match=r"int32 \[2, 3\]"):
        apply_token_bitmask(logits, torch.full((2, 2), -1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(logits, torch.full((2, 3), -1, dtype=torch.int64, device=device))


# ---------------------------------------------------------------------------- rows that ask for nothing


def test_nothing_to_process_returns_the_logits_themselves(device):
    logits = random_logits(3, device=device)
    params = [SamplingParams(), greedy(), SamplingParams(min_p=0.2)]  # min_p acts after temperature
    assert process_logits(logits, params) is logits
    history = [RowHistory([1], [2])] * 3
    assert process_logits(logits, [greedy(min_tokens=1)] * 3, history) is logits  # min_tokens reached


def test_mixed_batch_unprocessed_rows_are_unchanged(device):
    """Rows without processing get the tokens and logprobs of a batch that has none: greedy,
    seeded and unseeded (same default-generator state) rows."""
    logits = random_logits(8, vocab=300, seed=17, device=device)
    plain = [greedy(logprobs=3), SamplingParams(seed=11, top_p=0.9, logprobs=1),
             SamplingParams(temperature=0.7), SamplingParams(seed=12, top_k=40)]
    processed = [greedy(repetition_penalty=1.8, logprobs=2),
                 SamplingParams(seed=13, min_p=0.2, frequency_penalty=1.0),
                 SamplingParams(min_tokens=5, logit_bias={7: 30.0}), greedy(presence_penalty=-2.0)]
    history = [RowHistory(random_ids(9, 20 + i, 300), random_ids(7, 30 + i, 300),
                          pending=i % 2, pending_row=i) for i in range(8)]
    pending = torch.arange(8, device=device) * 3

    def run(params):
        torch.manual_seed(1234)  # the unseeded rows' noise
        gens = [make_generator(p.seed, device) for p in params]
        return sample(logits, params, gens, history=history, pending_tokens=pending, eos_token_ids={0})

    base_tokens, base_lps = run(plain + plain)
    tokens, lps = run(plain + processed)
    assert tokens[:4] == base_tokens[:4]
    assert [(lp.token_id, lp.logprob, lp.top) for lp in lps[:1]] == [(lp.token_id, lp.logprob, lp.top)
                                                                      for lp in base_lps[:1]]
    assert lps[1].logprob == base_lps[1].logprob and lps[1].top == base_lps[1].top
    assert tokens[4:] != base_tokens[4:]  # the processing really did something
    # a processed row's logprobs are still those of the raw logits
    assert lps[4].logprob == pytest.approx(torch.log_softmax(logits[4], -1)[tokens[4]].item(), abs=1e-6)
    assert tokens[6] == 7


def test_seeded_processed_row_does_not_depend_on_batch(device):
    logits = random_logits(4, vocab=500, seed=18, device=device)
    mine = SamplingParams(seed=5, temperature=1.2, min_p=0.05, repetition_penalty=1.4, frequency_penalty=0.5)
    h = RowHistory(random_ids(10, 40, 500), random_ids(10, 41, 500))
    gen = make_generator(5, device)
    alone = [sample(logits[2:3], [mine], [gen], history=[h])[0][0] for _ in range(5)]
    params = [SamplingParams(), greedy(), mine, SamplingParams(seed=1, presence_penalty=1.0)]
    gens = [make_generator(p.seed, device) for p in params]
    batched = [sample(logits, params, gens, history=[h] * 4)[0][2] for _ in range(5)]
    assert alone == batched


def test_draw_does_not_write_the_logits(device):
    logits = random_logits(2, device=device)
    before = logits.clone()
    bitmask = torch.zeros(2, 3, dtype=torch.int32, device=device) + 5
    draw(logits, [greedy(logit_bias={1: 3.0}), greedy(repetition_penalty=2.0)], [None, None],
         history=[RowHistory([1], [2])] * 2, bitmask=bitmask).to_host()
    assert torch.equal(logits, before)


def test_non_contiguous_logits(device):
    logits = random_logits(VOCAB, vocab=3, device=device).t()  # [3, VOCAB], column-major
    params = [greedy(logit_bias={5: 50.0}), greedy(min_tokens=3), greedy(frequency_penalty=1.0)]
    history = [RowHistory([1], [2, 2])] * 3
    processed = process_logits(logits, params, history, eos_token_ids={int(logits[1].argmax())})
    expected = logits.contiguous().clone()
    expected[0, 5] += 50.0
    expected[1, logits[1].argmax()] = -torch.inf
    expected[2, 2] -= 2.0
    assert torch.equal(processed, expected)


# ---------------------------------------------------------------------------- in the engine


def run_engine(loaded, async_scheduling, requests, eos_token_ids):
    engine = Engine(loaded.model, loaded.tokenizer, None,
                    EngineConfig(async_scheduling=async_scheduling, kv_cache_tokens=96, block_size=4,
                                 max_num_batched_tokens=16, max_num_seqs=8),
                    eos_token_ids=eos_token_ids)
    outputs: dict[str, list[int]] = {}
    for req in requests:
        tokens = outputs.setdefault(req.request_id, [])
        req.on_output = lambda out, tokens=tokens: tokens.extend(out.token_ids)
        engine.add_request(req)
    engine.run_until_done()
    return outputs


@pytest.mark.usefixtures("reference_kernels")
def test_engine_async_scheduling_counts_the_pending_token(loaded):
    """With one step in flight every history has a token still on the device: the outputs
    are those of the synchronous engine, which has none (a small cache: preemptions too)."""
    prompt = loaded.tokenizer.encode("the quick brown")
    free_request = Request("free", prompt, greedy(max_tokens=12, ignore_eos=True))
    free = run_engine(loaded, False, [free_request], set())["free"]
    assert len(set(free[:6])) == 6, "the test needs six distinct tokens"
    eos = {free[5]}

    def requests():
        # Penalties that favour repeats, so the latest token (pending under async) counts.
        return [
            # a stop id blocked; EOS at the first token that may end the output
            Request("min-4", prompt, greedy(max_tokens=12, min_tokens=4, stop_token_ids=[free[1]])),
            Request("min-5", prompt, greedy(max_tokens=12, min_tokens=5)),
            Request("rep", prompt, greedy(max_tokens=12, repetition_penalty=0.2, ignore_eos=True)),
            Request("freq", list(range(5, 25)),
                    greedy(max_tokens=14, frequency_penalty=-2.0, ignore_eos=True)),
            Request("presence", prompt, greedy(max_tokens=14, presence_penalty=-2.0, ignore_eos=True)),
            Request("sampled", prompt, SamplingParams(max_tokens=10, seed=3, frequency_penalty=-2.0,
                                                      min_p=0.1, logit_bias={free[2]: 2.0},
                                                      ignore_eos=True)),
            Request("plain", prompt, greedy(max_tokens=12, ignore_eos=True)),
        ]
    sync = run_engine(loaded, False, requests(), eos)
    overlapped = run_engine(loaded, True, requests(), eos)
    assert sync == overlapped
    assert sync["plain"] == free
    assert free[1] not in sync["min-4"][:4] and sync["min-5"][:6] == free[:6]
    assert sync["rep"] != free and sync["freq"] != sync["plain"]


@pytest.mark.usefixtures("reference_kernels")
def test_engine_refuses_a_logit_bias_outside_the_vocabulary(loaded):
    engine = Engine(loaded.model, loaded.tokenizer, None, EngineConfig(kv_cache_tokens=256))
    vocab = loaded.model.config.vocab_size
    with pytest.raises(RequestError, match=f"outside the vocabulary \\(size {vocab}\\): {vocab}"):
        engine.add_request(Request("bad", [1, 2], greedy(logit_bias={vocab: 1.0})))
    assert not engine.requests
