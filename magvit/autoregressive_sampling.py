"""Autoregressive decoding (VQGAN's sampling) of a causal prior, with or without a key/value cache.

A sequence is a ``(B, L)`` tensor of ids whose first ``start`` positions are the condition (task, class, prefix
codes) and are never altered; positions ``start ... L - 1`` are generated one at a time in order (raster order of
the code grid), each sampled from the model's next-token distribution restricted to the codebook, with temperature,
top-k and top-p (nucleus) filtering. With the cache the condition is read once and each later step feeds one token;
without it every step re-reads the whole sequence so far (the reference the cache must equal).

The model is a causal prior such as :class:`magvit.autoregressive.AutoregressiveTransformer`: ``model(ids (B, n))
-> logits (B, n, V)`` and ``model.forward_cached(ids (B, n), cache) -> (logits (B, n, V), cache)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .progress import progress as progress_bar
from .sampling import ARGMAX_TEMPERATURE


class CausalPrior(Protocol):
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def forward_cached(self, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]: ...


def _gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU so that a CPU generator gives the same numbers on every device.
    u = torch.rand(shape, generator=generator, dtype=torch.float32).to(device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``(..., K)`` with every code outside the ``top_k`` most likely and outside the smallest set whose
    probability reaches ``top_p`` (the nucleus; the most likely code always stays) set to ``-inf``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # (..., K) the mass of the more likely codes
        outside = (before >= top_p).scatter(-1, order, before >= top_p)  # back to code order
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def sample_codes(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes ``(B,)`` drawn from ``softmax(logits / temperature)`` ``(B, K)`` after :func:`filter_logits` (as
    ``transformers``' samplers order them: temperature, top-k, top-p); a temperature <= ``ARGMAX_TEMPERATURE`` (0 too) takes the argmax. The
    Gumbel-max trick with noise drawn on the CPU: the same draws from a CPU generator on every device."""
    if temperature <= ARGMAX_TEMPERATURE:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return (filtered + _gumbel(filtered.shape, generator, filtered.device)).argmax(dim=-1)


def _check(tokens: torch.Tensor, uncond_tokens: torch.Tensor | None, start: int, temperature: float,
           top_k: int | None, top_p: float | None) -> None:
    if tokens.dim() != 2 or not 1 <= start <= tokens.shape[1]:
        raise ValueError(f"tokens must be (B, L) with 1 <= start <= L, got {tuple(tokens.shape)} and start {start}")
    if uncond_tokens is not None and uncond_tokens.shape != tokens.shape:
        raise ValueError(f"uncond_tokens {tuple(uncond_tokens.shape)} must match tokens {tuple(tokens.shape)}")
    if not temperature >= 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1, got {temperature}, {top_k}, "
                         f"{top_p}")


@torch.no_grad()
def autoregressive_decode(
    model: CausalPrior,
    tokens: torch.Tensor,
    *,
    start: int,
    codebook_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 0.0,
    uncond_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Generate positions ``start ... L - 1`` of ``tokens`` ``(B, L)`` one after the other; returns ``(B, L)`` with
    the first ``start`` positions unchanged (whatever the later positions held is replaced).

    - Each code is drawn by :func:`sample_codes` from the logits of the position before it, restricted to the
      ``codebook_size`` codes (special tokens are never generated).
    - Classifier-free guidance: with ``uncond_tokens`` (the same sequences with the condition replaced by its
      dropped form) the logits are ``cond + guidance_scale * (cond - uncond)``; both sequences share the generated
      codes.
    - ``use_cache=False`` re-reads the whole sequence at every step: the same codes under the same ``generator``
      (up to float rounding of the two ways of computing attention), ``L - start`` times the work.
    """
    _check(tokens, uncond_tokens, start, temperature, top_k, top_p)
    guided = uncond_tokens is not None and guidance_scale != 0.0
    batch = tokens.shape[0]
    both = torch.cat([tokens, uncond_tokens]) if guided else tokens.clone()  # (B or 2B, L)

    cache = None
    for pos in progress_bar(range(start, tokens.shape[1]), desc="decoding", unit="token", disable=not progress,
                            leave=False, terminal_only=True):
        if not use_cache:
            logits = model(both[:, :pos])  # (B or 2B, pos, V)
        elif cache is None:  # the condition, read once
            logits, cache = model.forward_cached(both[:, :pos])
        else:  # the code generated last
            logits, cache = model.forward_cached(both[:, pos - 1:pos], cache)
        last = logits[:, -1, :codebook_size].float()  # (B or 2B, K)
        if guided:
            cond, uncond = last.chunk(2)
            last = cond + guidance_scale * (cond - uncond)
        code = sample_codes(last, temperature, top_k, top_p, generator)  # (B,)
        both[:, pos] = code.repeat(both.shape[0] // batch)
    return both[:batch]
