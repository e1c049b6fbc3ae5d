"""Iterative decoding with fake tokens -> logits callables: masks, schedule, fixed tokens, determinism, guidance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from magvit.sequence import CodeFactorization
from magvit.masking import mask_schedule
from magvit.sampling import iterative_decode, num_masked_after_step, sequential_decode

V = 16  # codebook size
MASK = V  # first special token
VOCAB = V + 4


class Oracle:
    """Fake model: always predicts the ground truth (confidently), counts its calls."""

    def __init__(self, truth: torch.Tensor):
        self.truth = truth
        self.calls = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert tokens.shape[0] % self.truth.shape[0] == 0
        truth = self.truth.repeat(tokens.shape[0] // self.truth.shape[0], 1)
        return F.one_hot(truth, VOCAB).float() * 50.0


def random_logits(tokens: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(tokens.sum()))  # a deterministic function of the input
    return torch.randn(*tokens.shape, VOCAB, generator=g)


def _problem(batch=3, length=300, fixed=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, V, (batch, length), generator=g)
    start = truth.clone()
    start[:, fixed:] = MASK
    return truth, start


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_oracle_model_returns_ground_truth(steps):
    truth, start = _problem()
    oracle = Oracle(truth)
    out = iterative_decode(oracle, start, mask_token=MASK, codebook_size=V, steps=steps,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, truth)
    assert oracle.calls == steps


@pytest.mark.parametrize("schedule", ["cosine", "linear", "square", "exponential"])
def test_reveals_per_schedule_and_never_leaves_masks(schedule):
    _, start = _problem(length=1040, fixed=16)
    n = 1024
    remaining = []
    out = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, steps=12, schedule=schedule,
                           on_step=lambda s, t: remaining.append((t == MASK).sum(dim=1).tolist()),
                           generator=torch.Generator().manual_seed(0))
    assert not bool((out == MASK).any())
    assert bool(((out >= 0) & (out < V)).all())
    counts = [r[0] for r in remaining]
    assert all(r == [r[0]] * 3 for r in remaining)  # the same count in every sample
    for step, count in enumerate(counts[:-1]):
        expected = math.floor(n * mask_schedule((step + 1) / 12, schedule))
        assert count == min(expected, (counts[step - 1] if step else n) - 1)
        assert count == num_masked_after_step(n, step, 12, schedule)
    assert counts[-1] == 0
    if schedule == "cosine":  # plain floor(N * gamma) with no clamping at this size
        assert counts[:3] == [math.floor(n * math.cos(math.pi / 2 * (s + 1) / 12)) for s in range(3)]


def test_fixed_tokens_never_altered_and_only_codebook_sampled():
    truth, start = _problem()
    start[:, 100:120] = 3  # fixed tokens in the middle too
    start[:, 0] = V + 2  # and special (non-codebook) tokens, like the task and class tokens

    def wants_special(tokens):  # a model that prefers special tokens and wrong codes everywhere
        logits = torch.zeros(*tokens.shape, VOCAB)
        logits[..., V:] = 100.0
        logits[..., 7] = 5.0
        return logits

    out = iterative_decode(wants_special, start, mask_token=MASK, codebook_size=V, temperature=0.0)
    fixed = start != MASK
    assert torch.equal(out[fixed], start[fixed])
    assert bool((out[~fixed] == 7).all())


def test_deterministic_with_seed_and_batched_samples_differ():
    _, start = _problem(batch=1)
    start = start.repeat(4, 1)  # 4 samples of one condition
    a = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, generator=torch.Generator().manual_seed(1))
    b = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, generator=torch.Generator().manual_seed(1))
    c = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_top_k_one_equals_argmax():
    _, start = _problem(batch=2)
    logits_table = torch.randn(2, start.shape[1], VOCAB, generator=torch.Generator().manual_seed(4))
    out = iterative_decode(lambda t: logits_table, start, mask_token=MASK, codebook_size=V, top_k=1,
                           temperature=2.0, generator=torch.Generator().manual_seed(0))
    gen = start == MASK
    assert torch.equal(out[gen], logits_table[..., :V].argmax(-1)[gen])


def test_classifier_free_guidance_combines_logits():
    truth, start = _problem(batch=2, length=50, fixed=10)
    uncond = start.clone()
    uncond[:, :10] = V + 1  # condition replaced by pad
    seen = []

    def model(tokens):
        seen.append(tokens.clone())
        cond_rows = (tokens[:, 0] != V + 1)[:, None, None]
        cond = torch.zeros(*tokens.shape, VOCAB)
        cond[..., 5] = 2.0
        cond[..., 6] = 1.5
        unc = torch.zeros(*tokens.shape, VOCAB)
        unc[..., 5] = 2.0
        unc[..., 6] = 0.0
        return torch.where(cond_rows, cond, unc)

    # without guidance code 5 wins, with guidance 3: cond + 3 (cond - uncond) favours 6 (1.5 + 4.5 > 2)
    plain = iterative_decode(model, start, mask_token=MASK, codebook_size=V, temperature=0.0)
    guided = iterative_decode(model, start, mask_token=MASK, codebook_size=V, temperature=0.0, guidance_scale=3.0,
                              uncond_tokens=uncond)
    assert bool((plain[:, 10:] == 5).all()) and bool((guided[:, 10:] == 6).all())
    assert seen[-1].shape[0] == 4  # conditional and unconditional in one batched call
    assert torch.equal(seen[-1][2:, :10], uncond[:, :10])
    assert torch.equal(seen[-1][2:, 10:], seen[-1][:2, 10:])  # both halves share the generated video


def test_sequential_baseline_one_token_per_call():
    truth, start = _problem(batch=2, length=30, fixed=10)
    oracle = Oracle(truth)
    out = sequential_decode(oracle, start, mask_token=MASK, codebook_size=V)
    assert torch.equal(out, truth)
    assert oracle.calls == 20


def test_errors():
    _, start = _problem(batch=2)
    start[1, 0] = MASK  # different number of masks per row
    with pytest.raises(ValueError, match="same number of mask tokens"):
        iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V)
    with pytest.raises(ValueError, match="steps"):
        iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, steps=0)


# --- the decoding loop as it was before token factorization: the flat-logits path must stay bit-identical ---------


def _reference_decode(logits_fn, tokens, *, steps, temperature, choice_temperature, top_k, guidance_scale,
                      uncond_tokens, generator, schedule="cosine"):
    """The pre-factorization ``iterative_decode`` loop, kept verbatim as the reference for the flat-logits path."""
    from magvit.sampling import _gumbel

    def guided(tokens, generate):
        if uncond_tokens is None or guidance_scale == 0.0:
            return logits_fn(tokens)[..., :V].float()
        both = logits_fn(torch.cat([tokens, torch.where(generate, tokens, uncond_tokens)]))[..., :V].float()
        cond, unc = both.chunk(2)
        return cond + guidance_scale * (cond - unc)

    def sample(logits):
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature <= 0:
            return logits.argmax(dim=-1)
        return (logits / temperature + _gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)

    generate = tokens == MASK
    num_unknown = int(generate[0].sum())
    tokens = tokens.clone()
    for step in range(steps):
        masked = tokens == MASK
        logits = guided(tokens, generate)
        proposal = sample(logits)
        sampled = torch.where(masked, proposal, tokens)
        num_masked = num_masked_after_step(num_unknown, step, steps, schedule)
        if num_masked == 0:
            tokens = sampled
            continue
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
        anneal = choice_temperature * (1.0 - (step + 1) / steps)
        confidence = log_probs + anneal * _gumbel(log_probs.shape, generator, log_probs.device)
        confidence = confidence.masked_fill(~masked, float("inf"))
        tokens = sampled.scatter(1, confidence.topk(num_masked, dim=1, largest=False).indices, MASK)
    return tokens


@pytest.mark.parametrize(("temperature", "top_k", "guidance_scale"),
                         [(1.0, None, 0.0), (0.7, 5, 2.0), (0.0, None, 1.5)])
def test_flat_logits_decode_is_bit_identical_to_the_reference(temperature, top_k, guidance_scale):
    _, start = _problem(batch=3, length=200, fixed=30)
    uncond = start.clone()
    uncond[:, :30] = V + 1
    kwargs = dict(steps=8, temperature=temperature, choice_temperature=4.5, top_k=top_k,
                  guidance_scale=guidance_scale, uncond_tokens=uncond if guidance_scale else None)
    ours = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V,
                            generator=torch.Generator().manual_seed(7), **kwargs)
    reference = _reference_decode(random_logits, start, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(ours, reference)


# --- factorised logits (B, L, F, S): V = 16 codes as 2 sub-tokens of 4 -----------------------------------------------

SPLIT = CodeFactorization(V, 2)


def factored_random_logits(tokens: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(tokens.sum()))
    return torch.randn(*tokens.shape, 2, 4, generator=g)


class FactoredOracle(Oracle):
    def __call__(self, tokens):
        self.calls += 1
        truth = self.truth.repeat(tokens.shape[0] // self.truth.shape[0], 1)
        return F.one_hot(SPLIT.split(truth), 4).float() * 50.0  # (B, L, 2, 4)


@pytest.mark.parametrize("steps", [1, 5])
def test_factorised_oracle_returns_ground_truth(steps):
    truth, start = _problem()
    oracle = FactoredOracle(truth)
    out = iterative_decode(oracle, start, mask_token=MASK, codebook_size=V, steps=steps,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, truth) and oracle.calls == steps
    assert torch.equal(sequential_decode(FactoredOracle(truth), start[:, :60], mask_token=MASK, codebook_size=V),
                       truth[:, :60])


def test_factorised_decode_fills_every_mask_and_keeps_fixed_tokens():
    _, start = _problem(length=400, fixed=40)
    start[:, 200:230] = 9
    start[:, 0] = V + 2  # a special token
    fixed = start != MASK
    for kwargs in (dict(), dict(temperature=0.0), dict(top_k=2, temperature=2.0)):
        out = iterative_decode(factored_random_logits, start, mask_token=MASK, codebook_size=V, steps=6,
                               generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(out[fixed], start[fixed])
        assert bool(((out[~fixed] >= 0) & (out[~fixed] < V)).all())
    # top_k=1 per sub-token is the merge of each head's argmax
    table = factored_random_logits(start)
    out = iterative_decode(lambda t: table, start, mask_token=MASK, codebook_size=V, top_k=1, temperature=3.0,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[~fixed], SPLIT.merge(table.argmax(-1))[~fixed])


def test_factorised_confidence_is_the_joint_log_probability():
    """Two unknown tokens, two steps, no noise: the one revealed first has the higher joint log-probability, even
    though the other has the single most confident sub-token."""
    start = torch.tensor([[3, MASK, MASK]])
    logits = torch.zeros(1, 3, 2, 4)
    logits[0, 1, 0, 2] = 30.0  # position 1: sub-token 0 certain (log p ~ 0), sub-token 1 uniform (log p = -1.39)
    logits[0, 2, :, 1] = 2.0  # position 2: both sub-tokens p = 0.71 (log p = -0.34 each, -0.69 jointly)
    seen = []
    out = iterative_decode(lambda t: logits, start, mask_token=MASK, codebook_size=V, steps=2, temperature=0.0,
                           choice_temperature=0.0, on_step=lambda s, t: seen.append(t.clone()))
    assert seen[0].tolist() == [[3, MASK, SPLIT.merge(torch.tensor([1, 1])).item()]]
    assert out[0, 1] // 4 == 2


def test_factorised_guidance_combines_each_head():
    _, start = _problem(batch=2, length=40, fixed=8)
    uncond = start.clone()
    uncond[:, :8] = V + 1

    def model(tokens):
        cond_rows = (tokens[:, 0] != V + 1)[:, None, None, None]
        cond = torch.zeros(*tokens.shape, 2, 4)
        cond[..., 1] = 2.0
        cond[..., 2] = 1.5
        unc = torch.zeros(*tokens.shape, 2, 4)
        unc[..., 1] = 2.0
        return torch.where(cond_rows, cond, unc)

    plain = iterative_decode(model, start, mask_token=MASK, codebook_size=V, temperature=0.0)
    guided = iterative_decode(model, start, mask_token=MASK, codebook_size=V, temperature=0.0, guidance_scale=3.0,
                              uncond_tokens=uncond)
    assert bool((plain[:, 8:] == 1 * 4 + 1).all()) and bool((guided[:, 8:] == 2 * 4 + 2).all())


def test_flat_and_one_factor_logits_decode_alike():
    _, start = _problem(batch=2, length=120, fixed=20)
    a = iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V,
                         generator=torch.Generator().manual_seed(5))
    b = iterative_decode(lambda t: random_logits(t)[..., :V], start, mask_token=MASK, codebook_size=V,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="neither a flat"):
        iterative_decode(lambda t: torch.zeros(*t.shape, 2, 3), start, mask_token=MASK, codebook_size=V)


# --- interior COMMIT conditioning: the condition region re-filled at every step ----------------------------------


def _interior_problem(batch=2, length=60, seed=3):
    """Sequences of ``[2 fixed tokens][video, all masked]`` and what still-masked slots show: the condition token
    in the region (the first 20 video slots), the mask token elsewhere."""
    g = torch.Generator().manual_seed(seed)
    start = torch.full((batch, length), MASK)
    start[:, :2] = torch.tensor([V + 2, V + 3])  # task and class tokens: fixed
    condition = start.clone()
    condition[:, 2:22] = torch.randint(0, V, (batch, 20), generator=g)
    return start, condition


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_interior_condition_refilled_at_every_step(guidance_scale):
    start, condition = _interior_problem()
    before = condition.clone()
    uncond = start.clone()
    uncond[:, 1] = V + 1  # the dropped class
    seen, states = [], [start]

    def model(tokens):
        seen.append(tokens.clone())
        return random_logits(tokens)

    out = iterative_decode(model, start, mask_token=MASK, codebook_size=V, steps=6, guidance_scale=guidance_scale,
                           uncond_tokens=uncond if guidance_scale else None, condition_tokens=condition,
                           on_step=lambda step, tokens: states.append(tokens.clone()),
                           generator=torch.Generator().manual_seed(0))
    assert len(seen) == 6 and torch.equal(condition, before) and bool((start[:, 2:] == MASK).all())  # not written to
    assert torch.equal(out[:, :2], start[:, :2])  # the fixed tokens come back exactly
    assert bool(((out[:, 2:] >= 0) & (out[:, 2:] < V)).all())  # every slot generated, the region too
    b = start.shape[0]
    for shown, state in zip(seen, states):  # state: the tokens before that step
        # a still-masked slot shows exactly its condition token in the region, the mask token outside
        assert torch.equal(shown[:b], torch.where(state == MASK, condition, state))
        if guidance_scale:  # the unconditional half sees no condition
            assert torch.equal(shown[b:], torch.where(start == MASK, state, uncond))
    assert not torch.equal(out[:, 2:22], condition[:, 2:22])  # refined, not pinned (random logits)


def test_interior_condition_with_an_oracle_and_pinned_tokens():
    start, condition = _interior_problem(batch=1)
    truth = condition.clone()
    truth[:, 22:] = torch.randint(0, V, (1, 38), generator=torch.Generator().manual_seed(5))
    # a model that copies what it is shown and predicts the truth at mask tokens returns the condition exactly
    def echo(tokens):
        return F.one_hot(torch.where(tokens == MASK, truth, tokens).clamp(max=VOCAB - 1), VOCAB).float() * 50.0

    out = iterative_decode(echo, start, mask_token=MASK, codebook_size=V, steps=4, condition_tokens=condition,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 2:22], condition[:, 2:22]) and torch.equal(out, truth)
    # condition tokens given as fixed inputs are never altered, whatever the model says
    pinned = start.clone()
    pinned[:, 2:22] = condition[:, 2:22]
    out = iterative_decode(random_logits, pinned, mask_token=MASK, codebook_size=V, steps=4,
                           condition_tokens=condition, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :22], pinned[:, :22])
    with pytest.raises(ValueError, match="condition_tokens"):
        iterative_decode(random_logits, start, mask_token=MASK, codebook_size=V, condition_tokens=condition[:, :10])
