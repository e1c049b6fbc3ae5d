"""Iterative parallel decoding (MaskGIT / MAGVIT's COMMIT) given any ``tokens -> logits`` callable.

A sequence is a ``(B, L)`` tensor of ids: positions holding ``mask_token`` are generated, every other position is
a fixed condition and is never altered. Each of the ``K`` steps predicts all masked positions at once, keeps the
most confident predictions and re-masks the rest, so that after step ``s`` exactly
``floor(N * mask_schedule((s + 1) / K))`` of the ``N`` initially masked tokens remain masked (at least one token is
revealed per step, and none remain after the last step).

With MAGVIT's interior COMMIT conditioning (``condition_tokens``) a masked position inside the condition region
shows the model its condition token instead of the mask token, re-filled before every step as the official sampler
does; it is still generated (the model refines the condition, it is not pinned).

The callable returns flat logits ``(B, L, V)`` (codes first, then special tokens) or, for a factorised model
(MAGVIT-v2's token factorization, :class:`magvit.sequence.CodeFactorization`), ``(B, L, F, S)``: one head per
sub-token. Internally both are code logits in factor form ``(B, L, F, S)`` (flat: ``F = 1``); every sub-token is
sampled from its own head and the sub-tokens are merged into the code.

``sequential_decode`` is the one-token-per-forward-pass baseline used by ``benchmarks/bench_decoding.py``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .sequence import CodeFactorization, factor_logits
from .masking import mask_schedule
from .progress import progress as progress_bar

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, L) long -> (B, L, V) or (B, L, F, S) float
# At or below this temperature sampling takes the argmax: logits / 1e-300 would overflow float32 to inf (every code
# tied, code 0 picked), and below 1e-4 the Gumbel noise no longer changes the winner of logits a few nats apart.
ARGMAX_TEMPERATURE = 1e-4
StepCallback = Callable[[int, torch.Tensor], None]  # (step, tokens (B, L)) after each step
# Parallel decoding's settings when neither a flag nor the export's ``decoding`` record gives one (MAGVIT: 12 steps,
# choice temperature 4.5).
DECODING_DEFAULTS: dict[str, float] = {"steps": 12, "temperature": 1.0, "choice_temperature": 4.5,
                                       "guidance_scale": 0.0}
MAX_SCALE = 1e4  # |guidance_scale| and choice_temperature: beyond it logits x scale overflow float32 into inf


def check_decoding(settings: dict, where: str) -> dict[str, float]:
    """``settings`` (a subset of ``DECODING_DEFAULTS``' keys, e.g. an export's untrusted ``decoding`` record) checked:
    ``ValueError`` naming ``where`` for an unknown key or a value out of range; returns it with ints / floats."""
    unknown = sorted(set(settings) - set(DECODING_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown decoding setting(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(DECODING_DEFAULTS)}")
    checked: dict[str, float] = {}
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: decoding {key} must be a finite number, got {value!r}")
        if key == "steps" and (int(value) != value or not 1 <= value <= 1 << 20):
            raise ValueError(f"{where}: decoding steps must be a whole number >= 1, got {value!r}")
        low, high = (-MAX_SCALE, MAX_SCALE) if key == "guidance_scale" else (0.0, MAX_SCALE)
        if not low <= value <= high:
            raise ValueError(f"{where}: decoding {key} must be in [{low:g}, {high:g}], got {value!r}")
        checked[key] = int(value) if key == "steps" else float(value)
    return checked


def recorded_decoding(model) -> dict[str, float]:
    """The decoding settings a masked transformer export records (its ``decoding``, chosen on held-out clips), each
    missing one at ``DECODING_DEFAULTS``."""
    record = getattr(model, "decoding", None) or {}
    return {**DECODING_DEFAULTS, **check_decoding(record, f"{type(model).__name__}'s decoding record")}


def decoding_settings(model, given: dict) -> dict:
    """``given`` (flag name -> value, ``None`` where not given) over the export's recorded decoding over the
    defaults: what a command decodes with. ``ValueError`` for a bad record."""
    return {**recorded_decoding(model), **{k: v for k, v in given.items() if v is not None}}


def _gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so that a CPU generator gives the same numbers on every device.
    u = torch.rand(shape, generator=generator, dtype=torch.float32).to(device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def _top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _guided_logits(logits_fn: LogitsFn, shown: torch.Tensor, tokens: torch.Tensor, uncond_tokens: torch.Tensor | None,
                   generate: torch.Tensor, guidance_scale: float, codebook_size: int) -> torch.Tensor:
    """Code logits in factor form ``(B, L, F, S)`` of the sequence ``shown`` to the model, with classifier-free
    guidance (per sub-token head) when ``uncond_tokens`` is given."""
    if uncond_tokens is None or guidance_scale == 0.0:
        return factor_logits(logits_fn(shown), codebook_size).float()
    # The unconditional sequence shares the partially generated video, but not the condition (nor its refill).
    uncond = torch.where(generate, tokens, uncond_tokens)
    both = factor_logits(logits_fn(torch.cat([shown, uncond])), codebook_size).float()
    cond_logits, uncond_logits = both.chunk(2)
    return cond_logits + guidance_scale * (cond_logits - uncond_logits)


def _check_inputs(tokens: torch.Tensor, uncond_tokens: torch.Tensor | None, mask_token: int,
                  condition_tokens: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, L), got {tuple(tokens.shape)}")
    for name, other in (("uncond_tokens", uncond_tokens), ("condition_tokens", condition_tokens)):
        if other is not None and other.shape != tokens.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must match tokens {tuple(tokens.shape)}")
    generate = tokens == mask_token
    if positions is not None:
        generate = generate & positions.to(tokens.device)
    counts = generate.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError("every sequence of the batch must have the same number of mask tokens")
    return generate


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """Sample ids ``(...)`` from ``logits`` ``(..., V)`` with temperature (<= ``ARGMAX_TEMPERATURE``: argmax) via
    the Gumbel-max trick."""
    logits = _top_k_filter(logits, top_k)
    if temperature <= ARGMAX_TEMPERATURE:
        return logits.argmax(dim=-1)
    return (logits / temperature + _gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)


def masked_counts(num_unknown: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens of ``num_unknown`` still masked after each of the ``steps`` decoding steps (the last is 0)."""
    counts, remaining = [], num_unknown
    for step in range(steps - 1):  # a loop, not recursion: any number of steps, O(steps)
        target = math.floor(num_unknown * mask_schedule((step + 1) / steps, schedule))
        # Reveal at least one token per step, and never re-mask more than is currently masked.
        remaining = max(0, min(remaining - 1, target))
        counts.append(remaining)
    return counts + [0]


def num_masked_after_step(num_unknown: int, step: int, steps: int, schedule: str = "cosine") -> int:
    """How many of ``num_unknown`` tokens are still masked after decoding step ``step`` (0-based) of ``steps``."""
    if step >= steps - 1:
        return 0
    return masked_counts(num_unknown, steps, schedule)[step]


@torch.no_grad()
def iterative_decode(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    *,
    mask_token: int,
    codebook_size: int,
    steps: int = 12,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    top_k: int | None = None,
    schedule: str = "cosine",
    guidance_scale: float = 0.0,
    uncond_tokens: torch.Tensor | None = None,
    condition_tokens: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Fill every ``mask_token`` position of ``tokens`` ``(B, L)`` in ``steps`` parallel steps; returns ``(B, L)``.

    - Samples each masked position from ``softmax(logits / temperature)`` restricted to the codebook (optionally to
      the ``top_k`` most likely codes; ``temperature=0`` takes the argmax). Factorised logits ``(B, L, F, S)``:
      each sub-token is sampled from its own head (``top_k`` per sub-token) and the sub-tokens form the code.
    - Confidence = log-probability of the sampled code (factorised: the sum of its sub-tokens' log-probabilities,
      the joint under the model) + Gumbel noise scaled by ``choice_temperature * (1 - (s + 1) / steps)``
      (annealed linearly to 0), as in MaskGIT.
    - The least confident predictions are re-masked so the count follows ``mask_schedule`` (see module doc).
    - Classifier-free guidance: with ``uncond_tokens`` (the same sequences with the condition replaced by its
      dropped form) the logits are ``cond + guidance_scale * (cond - uncond)``.
    - Interior conditioning: ``condition_tokens`` ``(B, L)`` is what each still-masked position shows the model (the
      condition token inside the condition region, ``mask_token`` elsewhere;
      ``sequence.interior_condition_tokens``), re-filled before every step; the unconditional branch sees the mask
      token there. Those positions are generated like every masked one.
    - ``positions`` ``(L,)`` or ``(B, L)`` bool: fill only the mask positions among them; the other mask positions
      stay masked and are shown as such (two code grids decode the top grid first, ``magvit.code_grids``).
    - Non-mask positions are fixed and returned unchanged; neither ``tokens`` nor ``condition_tokens`` is written
      to. Deterministic given ``generator``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    generate = _check_inputs(tokens, uncond_tokens, mask_token, condition_tokens, positions)  # (B, L) bool: to fill
    num_unknown = int(generate[0].sum())
    tokens = tokens.clone()
    if num_unknown == 0:
        return tokens

    counts = masked_counts(num_unknown, steps, schedule)  # once, not per step
    for step in progress_bar(range(steps), desc="decoding", unit="step", disable=not progress, leave=False,
                             terminal_only=True):
        unknown = tokens == mask_token  # (B, L) still masked, here or in a later call (``positions``)
        shown = tokens if condition_tokens is None else torch.where(unknown, condition_tokens, tokens)  # the refill
        masked = unknown & generate  # (B, L) still to fill in this call
        logits = _guided_logits(logits_fn, shown, tokens, uncond_tokens, generate, guidance_scale, codebook_size)
        factorization = CodeFactorization(codebook_size, logits.shape[-2])
        sub_tokens = _sample(logits, temperature, top_k, generator)  # (B, L, F) sub-token ids everywhere
        proposal = factorization.merge(sub_tokens)  # (B, L) codebook ids
        sampled = torch.where(masked, proposal, tokens)  # fixed / already revealed tokens stay
        num_masked = counts[step]
        if num_masked == 0:
            tokens = sampled
        else:
            # (B, L): log p(code) = sum of the sub-tokens' log-probabilities (one term when flat)
            log_probs = torch.log_softmax(logits, dim=-1).gather(-1, sub_tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
            anneal = choice_temperature * (1.0 - (step + 1) / steps)
            confidence = log_probs + anneal * _gumbel(log_probs.shape, generator, log_probs.device)
            confidence = confidence.masked_fill(~masked, float("inf"))  # known tokens are never re-masked
            lowest = confidence.topk(num_masked, dim=1, largest=False).indices  # (B, num_masked)
            tokens = sampled.scatter(1, lowest, mask_token)
        if on_step is not None:
            on_step(step, tokens)
    return tokens


@torch.no_grad()
def sequential_decode(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    *,
    mask_token: int,
    codebook_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    guidance_scale: float = 0.0,
    uncond_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Baseline: fill the mask positions one token per forward pass, in raster order (t, h, w)."""
    generate = _check_inputs(tokens, uncond_tokens, mask_token)
    tokens = tokens.clone()
    positions = generate.nonzero()[:, 1].view(tokens.shape[0], -1)  # (B, N) positions in raster order

    for i in progress_bar(range(positions.shape[1]), desc="decoding", unit="token", disable=not progress, leave=False,
                          terminal_only=True):
        logits = _guided_logits(logits_fn, tokens, tokens, uncond_tokens, generate, guidance_scale, codebook_size)
        pos = positions[:, i : i + 1]  # (B, 1)
        picked = logits.gather(1, pos[..., None, None].expand(-1, -1, *logits.shape[2:]))  # (B, 1, F, S)
        code = CodeFactorization(codebook_size, logits.shape[-2]).merge(_sample(picked, temperature, top_k, generator))
        tokens.scatter_(1, pos, code)
    return tokens
