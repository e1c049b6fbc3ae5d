"""Quantizers of the video tokenizer: MAGVIT's vector quantizer, MAGVIT-v2's lookup-free quantizer (LFQ) and finite
scalar quantization (FSQ, Mentzer et al. 2023), and the two continuous bottlenecks beside them: none (a plain
autoencoder) and kl (the KL-regularised diagonal-Gaussian posterior of Stable Diffusion's autoencoder, LDM).

The three quantizers map encoder latents ``z`` of shape ``(B, D, t, h, w)`` to a :class:`QuantizerOutput`
(straight-through ``quantized`` latents, integer ``codes`` ``(B, t, h, w)``, a scalar ``loss`` and detached
``stats``) and map codes back with ``codes_to_latents``. The continuous bottlenecks return the same output with
``codes=None`` and no code statistics (``codebook_usage`` / ``perplexity`` are absent, not NaN: there is no codebook
to count), and give the decoder's latents at inference with ``latents(z)``. All compute in fp32 with autocast
disabled, because nearest-code search and EMA statistics are unreliable in bf16 (near ties flip, EMA sums lose their
low bits).

Distributed training: the vector quantizer's mutable state (EMA counts and sums, k-means initialisation, dead-code
restarts) is all-reduced / broadcast over the default ``torch.distributed`` group whenever one is initialised
(``magvit.distributed``'s tensor collectives, no-ops in one process), so every rank keeps a bit-identical codebook.
Every rank makes the same collective calls in the same order: the calls depend only on the config, ``self.training``
and state that is itself synchronised (never on local data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .distributed import all_reduce_tensor_, broadcast_tensor_, get_rank


# FSQ levels the paper recommends for about 2^8, 2^10, 2^12, 2^14 and 2^16 codes (Mentzer et al. 2023, table 1).
FSQ_LEVELS: dict[int, tuple[int, ...]] = {
    240: (8, 6, 5),
    1000: (8, 5, 5, 5),
    4375: (7, 5, 5, 5, 5),
    15360: (8, 8, 8, 6, 5),
    64000: (8, 8, 8, 5, 5, 5),
}


@dataclass
class QuantizerConfig(Config):
    """Options of every quantizer (the tokenizer nests it as ``quantization``). Defaults follow MAGVIT / MAGVIT-v2
    (and LDM for the KL bottleneck)."""

    # Vector quantizer (MAGVIT): loss = codebook + commitment_beta * commitment + entropy_loss_weight * entropy.
    commitment_beta: float = 0.25
    # EMA codebook updates (VQ-VAE-2 style) instead of the codebook loss; the codebook loss term is dropped.
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    # k-means initialisation of the codebook from the first training batch (k-means++ seeding, Lloyd iterations).
    kmeans_init: bool = False
    kmeans_iters: int = 10
    # Restart codes whose EMA usage (assignments per global batch) falls below this with encoder outputs; 0 = off.
    dead_code_threshold: float = 0.0
    # Entropy loss (MAGVIT for VQ, "entropy penalty" for LFQ): E[H(q(z))] - gamma * H[E q(z)], q = softmax(-d/T).
    entropy_loss_weight: float = 0.1
    entropy_temperature: float = 0.01
    entropy_diversity_gamma: float = 1.0
    entropy_loss_type: Literal["softmax", "argmax"] = "softmax"  # VQ only, as in MAGVIT
    # Entropy weight schedule (VQ and LFQ): with entropy_anneal_steps > 0 the weight moves linearly from
    # entropy_anneal_from (at training step 0) to entropy_loss_weight (from step entropy_anneal_steps on), counted
    # in training forward passes of the quantizer (a persistent `entropy_step` buffer, so a resumed run continues;
    # under gradient accumulation every micro-batch counts). VidTok anneals from 3x its weight; the MAGVIT-v2
    # author advises annealing the weight down for large vocabularies (vector-quantize-pytorch issue 88).
    entropy_anneal_steps: int = 0
    entropy_anneal_from: float = 0.0
    # Lookup-free quantizer (MAGVIT-v2): loss = lfq_commitment_weight * commitment + entropy_loss_weight * entropy.
    lfq_commitment_weight: float = 0.25
    # Parameter-free normalisation of the LFQ input (vector-quantize-pytorch PR 89: "proved to be important"):
    # "none" (MAGVIT-v2), "group" = every latent channel (bit) to zero mean and unit variance over each frame's
    # h x w positions (GroupNorm with one group per channel, no affine; per frame, so causal models stay causal),
    # "layer" = every token's D channels to zero mean and unit variance (LayerNorm, no affine).
    lfq_norm: Literal["none", "group", "layer"] = "none"
    # Finite scalar quantization (Mentzer et al. 2023): levels per latent channel; K = prod(levels) codes, latent dim
    # = len(levels), no loss. Empty = the paper's levels for the tokenizer's codebook_size (see FSQ_LEVELS).
    fsq_levels: tuple[int, ...] = ()
    # KL bottleneck (LDM's AutoencoderKL): loss = kl_weight * KL(q(z|x) || N(0, I)), the KL in nats per clip (summed
    # over the latent, averaged over the batch) as LDM's. LDM weighs it against a per-clip *sum* of the pixel error;
    # this project's reconstruction loss is a per-pixel mean, so the same weight regularises relatively more.
    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_epsilon <= 0:
            raise ValueError(f"ema_epsilon must be > 0, got {self.ema_epsilon}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {self.dead_code_threshold}")
        if self.entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        if self.entropy_anneal_steps < 0:
            raise ValueError(f"entropy_anneal_steps must be >= 0 (0 = a constant weight), got {self.entropy_anneal_steps}")
        if self.lfq_norm not in ("none", "group", "layer"):
            raise ValueError(f"lfq_norm must be 'none', 'group' or 'layer', got {self.lfq_norm!r}")
        for name in ("commitment_beta", "entropy_loss_weight", "entropy_anneal_from", "lfq_commitment_weight",
                     "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.fsq_levels = tuple(self.fsq_levels)
        if any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels must all be >= 2 (one level carries no information), got {self.fsq_levels}")

    def entropy_weight_at(self, step: int) -> float:
        """The entropy loss weight at training step ``step`` (0-based): ``entropy_anneal_from`` at step 0, linear to
        ``entropy_loss_weight`` at ``entropy_anneal_steps`` and constant after it (constant throughout without an
        anneal)."""
        if self.entropy_anneal_steps <= 0 or step >= self.entropy_anneal_steps:
            return self.entropy_loss_weight
        progress = max(step, 0) / self.entropy_anneal_steps
        return self.entropy_anneal_from + (self.entropy_loss_weight - self.entropy_anneal_from) * progress

    @property
    def uses_entropy(self) -> bool:
        """Whether the entropy loss has a non-zero weight at any step."""
        return self.entropy_loss_weight > 0 or (self.entropy_anneal_steps > 0 and self.entropy_anneal_from > 0)

    def fsq_levels_for(self, codebook_size: int) -> tuple[int, ...]:
        """FSQ levels for a codebook of ``codebook_size`` codes: ``fsq_levels`` if set (their product must equal
        ``codebook_size``), else the paper's recommendation for that size. Raises ``ValueError`` otherwise."""
        if self.fsq_levels:
            if math.prod(self.fsq_levels) != codebook_size:
                raise ValueError(
                    f"FSQ's codebook_size is the product of fsq_levels: {'*'.join(map(str, self.fsq_levels))} = "
                    f"{math.prod(self.fsq_levels)}, but codebook_size is {codebook_size}"
                )
            return self.fsq_levels
        if codebook_size not in FSQ_LEVELS:
            raise ValueError(
                f"FSQ with codebook_size {codebook_size} needs quantization.fsq_levels (product = codebook_size); "
                f"sizes with the paper's levels: " + ", ".join(f"{k} -> {v}" for k, v in FSQ_LEVELS.items())
            )
        return FSQ_LEVELS[codebook_size]


class QuantizerOutput(NamedTuple):
    """Result of a quantizer's forward pass."""

    quantized: Tensor  # (B, D, t, h, w), input dtype, straight-through gradient to z (continuous: the latents)
    codes: Tensor | None  # (B, t, h, w) long; None for the continuous bottlenecks (none, kl)
    loss: Tensor  # scalar fp32: total quantizer loss to add to the generator loss
    # Detached fp32 scalars for logging. codebook_usage / perplexity count the vector quantizer's global batch (all
    # ranks) when it updates state in training; otherwise this rank's batch. Continuous bottlenecks have neither.
    stats: dict[str, Tensor]


# --- shared pieces --------------------------------------------------------------------------------------------------
def _check_latents(z: Tensor, dim: int, name: str) -> None:
    if not isinstance(z, Tensor) or z.dim() != 5 or z.shape[1] != dim:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name} expects latents of shape (B, {dim}, t, h, w), got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"{name} expects floating-point latents, got {z.dtype}")


def _check_codes(codes: Tensor, codebook_size: int, name: str) -> None:
    if not isinstance(codes, Tensor) or codes.dim() != 4:
        shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"{name}.codes_to_latents expects codes of shape (B, t, h, w), got {shape}")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name}.codes_to_latents expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(
            f"{name}.codes_to_latents expects codes in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
        )


def _flatten(z: Tensor) -> Tensor:
    """(B, D, t, h, w) -> (N, D) with N = B * t * h * w, in (b, t, h, w) order."""
    return z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])


def _unflatten(flat: Tensor, shape: torch.Size) -> Tensor:
    """(N, D) -> (B, D, t, h, w) for the latent ``shape`` it came from."""
    b, d, t, h, w = shape
    return flat.view(b, t, h, w, d).permute(0, 4, 1, 2, 3).contiguous()


def _code_counts(codes: Tensor, codebook_size: int) -> Tensor:
    """Assignments per code (K,) fp32 of integer ``codes`` (any shape): ``bincount`` without its host sync (on CUDA
    it reads the largest code to size its output), as an exact integer scatter-add."""
    flat = codes.reshape(-1).long()
    counts = torch.zeros(codebook_size, dtype=torch.long, device=codes.device)
    return counts.index_add_(0, flat, torch.ones_like(flat)).float()


def _usage_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of codes used and perplexity exp(H(usage)) from per-code counts (K,)."""
    usage = (counts > 0).float().mean()
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(torch.special.entr(probs).sum())
    return usage, perplexity


def _entropy_of_mean(probs: Tensor) -> Tensor:
    """H[E q] of per-token distributions probs (N, K), with MAGVIT's 1e-5 inside the log."""
    avg_probs = probs.mean(dim=0)
    return -(avg_probs * torch.log(avg_probs + 1e-5)).sum()


class _EntropySchedule:
    """The entropy weight of a quantizer under ``QuantizerConfig``'s anneal: a persistent ``entropy_step`` buffer
    (registered only when an anneal is configured, so the state dicts of constant-weight models are unchanged)
    counts training forward passes."""

    def _init_entropy_schedule(self) -> None:
        if self.config.entropy_anneal_steps > 0:
            self.register_buffer("entropy_step", torch.zeros((), dtype=torch.long))

    def _entropy_weight(self) -> float:
        """This step's weight; advances the step counter in training mode. The counter is read on the host (a sync
        on an accelerator) only while the anneal lasts; after it the constant weight is returned without a read.
        Every rank counts the same forward passes, so all ranks use the same weight."""
        cfg = self.config
        if cfg.entropy_anneal_steps <= 0:
            return cfg.entropy_loss_weight
        if getattr(self, "_anneal_done", False):
            return cfg.entropy_loss_weight
        step = int(self.entropy_step)
        if self.training:
            self.entropy_step.add_(1)
        self._anneal_done = step >= cfg.entropy_anneal_steps
        return cfg.entropy_weight_at(step)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - torch's signature
        self._anneal_done = False  # a loaded step may be inside the anneal: read it again
        super()._load_from_state_dict(*args, **kwargs)


# --- vector quantizer -----------------------------------------------------------------------------------------------
class VectorQuantizer(_EntropySchedule, nn.Module):
    """MAGVIT's vector quantizer: nearest code by L2 with a straight-through estimator.

    Loss: ``||sg(z) - e||^2`` (codebook, dropped under EMA) + ``beta * ||z - sg(e)||^2`` (commitment) + MAGVIT's
    entropy loss on ``softmax(-||z - e||^2 / T)`` over codes. Options (``QuantizerConfig``): EMA codebook updates with
    Laplace smoothing, k-means initialisation from the first training batch, restarts of dead codes from encoder
    outputs. Mutations happen only in training mode and are synchronised across ranks.

    State (all persistent, so ``save_pretrained``/``from_pretrained`` restores identical codes): ``codebook`` (K, D)
    (a parameter trained by the codebook loss, or a buffer under EMA), ``ema_cluster_size`` (K,) (EMA of assignments
    per global batch; kept under EMA or when restarts are on), ``ema_embed_sum`` (K, D) (EMA only), ``initialized``
    (k-means done). EMA buffers and an EMA codebook stay fp32 even if the module is cast to bf16.

    Note: k-means init and restarts write into the codebook in place. With a gradient-trained codebook
    (``use_ema=False``) an optimiser that keeps fp32 master weights (DeepSpeed bf16 / ZeRO) would overwrite those
    writes at its next step; use ``use_ema=True`` with k-means init or restarts there.
    """

    _FP32_BUFFERS = ("codebook", "ema_cluster_size", "ema_embed_sum")

    def __init__(self, codebook_size: int, dim: int, config: QuantizerConfig | None = None) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.config = config if config is not None else QuantizerConfig()
        self.codebook_size = codebook_size
        self.dim = dim
        # MAGVIT's init: variance_scaling(1.0, "fan_in", "uniform") over a (K, D) table, i.e. U(+-sqrt(3 / K)).
        bound = math.sqrt(3.0 / codebook_size)
        codebook = torch.empty(codebook_size, dim).uniform_(-bound, bound)
        if self.config.use_ema:
            self.register_buffer("codebook", codebook)
            # Counts start at 1 and sums at the codebook, so sums / counts reproduces the initial codebook.
            self.register_buffer("ema_embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(0 if self.config.kmeans_init else 1, dtype=torch.uint8))
        self._known_initialized = False  # host copy of a True `initialized`: reading the buffer is a host sync
        self._init_entropy_schedule()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - torch's signature
        self._known_initialized = False  # a loaded `initialized` may differ: read it again
        super()._load_from_state_dict(*args, **kwargs)

    def _needs_kmeans_init(self) -> bool:
        """Whether k-means has yet to run; reads the buffer (a host sync) only until it says done."""
        if self.config.kmeans_init and not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self.config.kmeans_init and not self._known_initialized

    @property
    def _mutates(self) -> bool:
        """Whether training steps write into the codebook / EMA state."""
        return self.config.use_ema or self.config.dead_code_threshold > 0

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        # Keep EMA statistics (and an EMA codebook) fp32 when the module is cast to bf16 (e.g. by DeepSpeed): their
        # running sums would otherwise lose their low bits every step.
        super()._apply(fn, recurse)
        for name in self._FP32_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @staticmethod
    def _distances(flat: Tensor, codebook: Tensor) -> Tensor:
        """Squared L2 distances (N, K) up to the per-row constant ||z||^2 (which changes neither the argmin nor the
        softmax over codes): ||e||^2 - 2 z.e."""
        return torch.addmm(codebook.pow(2).sum(dim=1)[None, :], flat, codebook.t(), alpha=-2.0)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Codebook vectors of ``codes`` (B, t, h, w) as latents (B, D, t, h, w) in the codebook's dtype."""
        _check_codes(codes, self.codebook_size, type(self).__name__)
        return self.codebook[codes.long()].permute(0, 4, 1, 2, 3).contiguous()

    def latents_to_codes(self, z: Tensor) -> Tensor:
        """Nearest-code indices (B, t, h, w) of ``z`` (B, D, t, h, w): the codes of :meth:`forward` without its
        losses, statistics or codebook updates (the inference path of ``VideoTokenizer.encode``)."""
        _check_latents(z, self.dim, type(self).__name__)
        b, _, t, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._distances(_flatten(z.float()), self.codebook.float()).argmin(dim=1).view(b, t, h, w)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` (B, D, t, h, w). In training mode also runs k-means init / EMA / restarts as configured."""
        _check_latents(z, self.dim, type(self).__name__)
        cfg = self.config
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = _flatten(z.float())  # (N, D) fp32
            if self.training and self._needs_kmeans_init():
                self._kmeans_init(flat.detach())
            codebook = self.codebook.float()
            if self.training and self._mutates:
                codebook = codebook.clone()  # autograd keeps this copy; the buffers are updated in place below
            distances = self._distances(flat, codebook)  # (N, K)
            codes = distances.detach().argmin(dim=1)  # (N,)
            quantized = F.embedding(codes, codebook)  # (N, D)

            commitment_loss = F.mse_loss(flat, quantized.detach())
            zero = flat.new_zeros(())
            codebook_loss = zero if cfg.use_ema else F.mse_loss(quantized, flat.detach())
            entropy_weight = self._entropy_weight()
            entropy_loss = self._entropy_loss(distances) if cfg.uses_entropy else zero
            loss = codebook_loss + cfg.commitment_beta * commitment_loss + entropy_weight * entropy_loss

            counts = _code_counts(codes, self.codebook_size)  # (K,)
            restarted = zero
            if self.training and self._mutates:
                counts, restarted = self._update(flat.detach(), codes, counts)  # counts become global

            quantized = flat + (quantized - flat).detach()  # straight-through estimator
            usage, perplexity = _usage_stats(counts)
        b, _, t, h, w = z.shape
        stats = {
            "codebook_usage": usage,
            "perplexity": perplexity,
            "commitment_loss": commitment_loss.detach(),
            "codebook_loss": codebook_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            "restarted_codes": restarted,
        }
        return QuantizerOutput(_unflatten(quantized, z.shape).to(z.dtype), codes.view(b, t, h, w), loss, stats)

    def _entropy_loss(self, distances: Tensor) -> Tensor:
        """MAGVIT's entropy loss on affinities -distances / T: mean per-token entropy - gamma * entropy of the mean."""
        cfg = self.config
        logits = -distances / cfg.entropy_temperature  # (N, K)
        probs = logits.softmax(dim=1)
        log_probs = logits.log_softmax(dim=1)
        if cfg.entropy_loss_type == "argmax":  # one-hot forward, softmax gradient
            onehot = F.one_hot(logits.argmax(dim=1), self.codebook_size).to(probs.dtype)
            probs = probs - (probs - onehot).detach()
        sample_entropy = -(probs * log_probs).sum(dim=1).mean()
        return sample_entropy - cfg.entropy_diversity_gamma * _entropy_of_mean(probs)

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """EMA statistics / codebook update and dead-code restarts for one training batch.

        flat: (N, D) fp32 encoder outputs, codes: (N,), counts: (K,) local assignments. Returns the global counts and
        the number of restarted codes.
        """
        cfg = self.config
        k = self.codebook_size
        decay = cfg.ema_decay
        if cfg.use_ema:
            sums = flat.new_zeros(k, self.dim).index_add_(0, codes, flat)  # (K, D)
            packed = all_reduce_tensor_(torch.cat([counts[:, None], sums], dim=1))  # one collective for both
            counts, sums = packed[:, 0].contiguous(), packed[:, 1:]
        else:
            counts = all_reduce_tensor_(counts)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        if cfg.use_ema:
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            self.codebook.copy_(self._ema_codebook())
        restarted = flat.new_zeros(())
        if cfg.dead_code_threshold > 0:
            restarted = self._restart_dead_codes(flat)
        return counts, restarted

    def _ema_codebook(self) -> Tensor:
        """Codebook from the EMA sums and Laplace-smoothed EMA counts: e_i = m_i / ((n_i + eps) / (n + K eps) * n)."""
        size = self.ema_cluster_size
        total = size.sum()
        smoothed = (size + self.config.ema_epsilon) / (total + self.codebook_size * self.config.ema_epsilon) * total
        return self.ema_embed_sum / smoothed[:, None]

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> Tensor:
        """Replace codes whose EMA usage is below the threshold with encoder outputs of rank 0's batch."""
        threshold = self.config.dead_code_threshold
        dead = (self.ema_cluster_size < threshold).float()  # (K,)
        # The usage EMA is already identical on all ranks; the MAX makes the decision provably identical (a rank
        # that took a different branch would wait forever in the broadcast below).
        dead = all_reduce_tensor_(dead, op="max").bool()
        num_dead = int(dead.sum())
        if num_dead == 0:
            return flat.new_zeros(())
        candidates = _sample_vectors(flat, self.codebook_size)  # (K, D)
        broadcast_tensor_(candidates, src=0)
        self.codebook[dead] = candidates[dead].to(self.codebook.dtype)
        # A restarted code starts at the threshold: it must be used about that often per batch to stay.
        self.ema_cluster_size[dead] = threshold
        if self.config.use_ema:
            self.ema_embed_sum[dead] = candidates[dead] * threshold
        return flat.new_tensor(float(num_dead))

    @torch.no_grad()
    def _kmeans_init(self, flat: Tensor) -> None:
        """k-means on the (global) first batch: k-means++ seeds from rank 0, Lloyd steps on all ranks' data."""
        k = self.codebook_size
        centroids = flat.new_zeros(k, self.dim)
        if get_rank() == 0:
            centroids = _kmeans_plus_plus(flat, k)
        broadcast_tensor_(centroids, src=0)
        counts = flat.new_zeros(k)
        for _ in range(self.config.kmeans_iters):
            codes = self._distances(flat, centroids).argmin(dim=1)
            local = torch.cat(
                [_code_counts(codes, k)[:, None], flat.new_zeros(k, self.dim).index_add_(0, codes, flat)],
                dim=1,
            )
            packed = all_reduce_tensor_(local)  # (K, 1 + D): counts and sums of all ranks
            counts, sums = packed[:, 0], packed[:, 1:]
            # An empty cluster keeps its centroid.
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centroids)
        self.codebook.copy_(centroids)
        size = counts.clamp_min(1.0)  # assignments per batch; >= 1 so that EMA sums / counts stays finite
        self.ema_cluster_size.copy_(size)
        if self.config.use_ema:
            self.ema_embed_sum.copy_(centroids * size[:, None])
        self.initialized.fill_(1)
        self._known_initialized = True


def _sample_vectors(flat: Tensor, num: int) -> Tensor:
    """``num`` rows of ``flat`` (N, D): without replacement when N >= num."""
    n = flat.shape[0]
    if n >= num:
        index = torch.randperm(n, device=flat.device)[:num]
    else:
        index = torch.randint(n, (num,), device=flat.device)
    return flat[index].clone()


def _kmeans_plus_plus(x: Tensor, k: int) -> Tensor:
    """k-means++ seeds (k, D) from points x (N, D): each seed drawn with probability proportional to D(x)^2.

    One-time cost O(k * N * D) (like one Lloyd step) with k small kernel launches.
    """
    n = x.shape[0]
    centroids = x.new_empty(k, x.shape[1])
    first = torch.randint(n, (1,), device=x.device)
    centroids[0] = x[first[0]]
    min_dist = (x - centroids[0]).pow(2).sum(dim=1)  # (N,)
    for i in range(1, k):
        # The tiny floor makes the draw uniform once every point coincides with a seed (N < k or duplicates).
        index = torch.multinomial(min_dist + 1e-30, 1)[0]
        centroids[i] = x[index]
        min_dist = torch.minimum(min_dist, (x - x[index]).pow(2).sum(dim=1))
    return centroids


# --- lookup-free quantizer ------------------------------------------------------------------------------------------
class LookupFreeQuantizer(_EntropySchedule, nn.Module):
    """MAGVIT-v2's lookup-free quantizer: latent dim D = log2(K), q = sign(z) in {-1, +1}^D, index = sum_i b_i 2^i.

    Channel i is bit i (b_i = 1 for q_i = +1). Loss: ``lfq_commitment_weight * ||z - sg(q)||^2`` +
    ``entropy_loss_weight * (E[H(q(z))] - gamma * H[E q(z)])`` with ``q(c | z) = softmax_c(-||z - c||^2 / T)``.
    For +-1 codes ``q`` is a product of per-bit Bernoullis with ``p(b_i = 1) = sigmoid(4 z_i / T)``, so no (N, K)
    softmax is ever built: the per-token entropy is a sum over bits, O(N * D); the entropy of the batch-mean
    distribution ``E q`` (which does not factorise over bits) is computed exactly from the two half-codes' joint
    distributions, one (2^(D - D/2), N) x (N, 2^(D/2)) matrix product: O(N * K) time in a GEMM, O(N * sqrt(K) + K)
    memory (K = 2^18, 2560 tokens: 5 MiB per half instead of 2.5 GiB per (N, K) tensor). No parameters or buffers.
    """

    def __init__(self, codebook_size: int, config: QuantizerConfig | None = None) -> None:
        super().__init__()
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"LookupFreeQuantizer needs a codebook size that is a power of two >= 2, got {codebook_size}")
        self.config = config if config is not None else QuantizerConfig()
        self.codebook_size = codebook_size
        self.dim = codebook_size.bit_length() - 1
        self._init_entropy_schedule()

    def normalize(self, z: Tensor) -> Tensor:
        """``z`` (B, D, t, h, w) after ``config.lfq_norm`` (parameter-free; ``z`` itself for "none"), in z's dtype:
        "group" = each channel of each frame to zero mean / unit variance over its h x w positions, "layer" = each
        token's D channels to zero mean / unit variance."""
        kind = self.config.lfq_norm
        if kind == "group":
            b, d, t, h, w = z.shape
            frames = z.transpose(1, 2).reshape(b * t, d, h * w)  # (B*t, D, h*w)
            return F.group_norm(frames, d, eps=1e-5).view(b, t, d, h, w).transpose(1, 2)
        if kind == "layer":
            return F.layer_norm(z.movedim(1, -1), (z.shape[1],), eps=1e-5).movedim(-1, 1)
        return z

    def _bit_weights(self, device: torch.device) -> Tensor:
        return torch.pow(2, torch.arange(self.dim, device=device))  # (D,) long: 1, 2, 4, ...

    def code_vectors(self, device: torch.device | str = "cpu") -> Tensor:
        """All K codes as +-1 vectors (K, D), row i = code i."""
        bits = (torch.arange(self.codebook_size, device=device)[:, None] & self._bit_weights(device)) > 0
        return bits.float() * 2.0 - 1.0

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """+-1 latents (B, D, t, h, w) fp32 of ``codes`` (B, t, h, w)."""
        _check_codes(codes, self.codebook_size, type(self).__name__)
        bits = (codes.long()[..., None] & self._bit_weights(codes.device)) > 0  # (B, t, h, w, D)
        return (bits.float() * 2.0 - 1.0).permute(0, 4, 1, 2, 3).contiguous()

    def latents_to_codes(self, z: Tensor) -> Tensor:
        """Code indices (B, t, h, w) of ``z`` (B, D, t, h, w) from its sign bits, without the entropy terms of
        :meth:`forward` (an (N, K) softmax): the inference path of ``VideoTokenizer.encode``."""
        _check_latents(z, self.dim, type(self).__name__)
        b, _, t, h, w = z.shape
        if self.config.lfq_norm != "none":
            with torch.autocast(device_type=z.device.type, enabled=False):
                z = self.normalize(z.float())
        return ((_flatten(z) > 0).long() * self._bit_weights(z.device)).sum(dim=1).view(b, t, h, w)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` (B, D, t, h, w) with D = log2(K)."""
        _check_latents(z, self.dim, type(self).__name__)
        cfg = self.config
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = _flatten(self.normalize(z.float()))  # (N, D)
            bits = flat > 0  # sign(z), with 0 -> -1
            quantized = bits.float() * 2.0 - 1.0
            codes = (bits.long() * self._bit_weights(z.device)).sum(dim=1)  # (N,)
            commitment_loss = F.mse_loss(flat, quantized)
            zero = flat.new_zeros(())
            sample_entropy = codebook_entropy = entropy_loss = zero
            entropy_weight = self._entropy_weight()
            if cfg.uses_entropy:
                sample_entropy, codebook_entropy = self._entropies(flat)
                entropy_loss = sample_entropy - cfg.entropy_diversity_gamma * codebook_entropy
            loss = cfg.lfq_commitment_weight * commitment_loss + entropy_weight * entropy_loss
            counts = _code_counts(codes, self.codebook_size)
            usage, perplexity = _usage_stats(counts)
            quantized = flat + (quantized - flat).detach()  # straight-through estimator
        b, _, t, h, w = z.shape
        stats = {
            "codebook_usage": usage,
            "perplexity": perplexity,
            "commitment_loss": commitment_loss.detach(),
            "codebook_loss": zero.detach(),  # no codebook to learn
            "entropy_loss": entropy_loss.detach(),
            "sample_entropy": sample_entropy.detach(),
            "codebook_entropy": codebook_entropy.detach(),
        }
        return QuantizerOutput(_unflatten(quantized, z.shape).to(z.dtype), codes.view(b, t, h, w), loss, stats)

    def _entropies(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(E[H(q(z))], H[E q(z)]) for q(c | z) = softmax_c(-||z - c||^2 / T) over the +-1 codes c, exactly.

        -||z - c||^2 = 2 z.c - ||z||^2 - D, so the softmax only sees 2 z.c / T = sum_i 2 z_i c_i / T: a product of
        per-bit Bernoullis with logit x_i = 4 z_i / T, whose entropy is sum_i softplus(x_i) - x_i sigmoid(x_i).
        """
        bit_logits = 4.0 * flat / self.config.entropy_temperature  # (N, D)
        sample_entropy = (F.softplus(bit_logits) - bit_logits * torch.sigmoid(bit_logits)).sum(dim=1).mean()
        return sample_entropy, self._codebook_entropy(bit_logits)

    def _codebook_entropy(self, bit_logits: Tensor) -> Tensor:
        """H[E q] (MAGVIT's 1e-5 inside the log) from per-bit logits (N, D), without an (N, K) tensor.

        Split the code into its low D_lo = D // 2 bits and high D_hi = D - D_lo bits. Per token q(c) = q_lo(c_lo)
        q_hi(c_hi), so E q[c_hi * 2^D_lo + c_lo] = (1/N) sum_n q_hi[n, c_hi] q_lo[n, c_lo] = (Q_hi^T Q_lo / N): the
        whole (2^D_hi, 2^D_lo) = K table of the batch-mean distribution is one matrix product.
        """
        n = bit_logits.shape[0]
        low_bits = self.dim // 2
        q_lo = self._half_code_probs(bit_logits[:, :low_bits])  # (N, 2^D_lo)
        q_hi = self._half_code_probs(bit_logits[:, low_bits:])  # (N, 2^D_hi)
        avg_probs = (q_hi.t() @ q_lo).flatten() / n  # (K,), index c_hi * 2^D_lo + c_lo = the code
        return -(avg_probs * torch.log(avg_probs + 1e-5)).sum()

    @staticmethod
    def _half_code_probs(bit_logits: Tensor) -> Tensor:
        """Joint probabilities (N, 2^d) of the codes of d bits (index sum_i b_i 2^i) from their logits (N, d).

        log q(c) = sum_i log sigmoid(+-x_i): a sum of non-positive terms (no cancellation), as one matrix product
        with the (2d, 2^d) table of [b_i; 1 - b_i] over codes. Probabilities below e^-40 (4e-18) become exact zeros:
        that moves H[E q] by < 1e-12, and keeps the product of the two halves out of fp32 denormals, on which the
        codebook GEMM runs ~20x slower on CPU (confident bits at T = 0.01 give q(c) = e^-100 and less).
        """
        d = bit_logits.shape[1]
        codes = torch.arange(2**d, device=bit_logits.device)
        bits = ((codes[None, :] >> torch.arange(d, device=bit_logits.device)[:, None]) & 1).float()  # (d, 2^d)
        log_bits = torch.cat([F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)], dim=1)  # (N, 2d): b = 1, b = 0
        log_probs = log_bits @ torch.cat([bits, 1.0 - bits], dim=0)  # (N, 2^d)
        return torch.exp(log_probs.masked_fill(log_probs < -40.0, float("-inf")))


# --- finite scalar quantizer ----------------------------------------------------------------------------------------
class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): channel i of the latent is bounded to ``levels[i]`` values
    and rounded; the code is the mixed-radix number of the per-channel level indices.

    ``bound(z) = tanh(z + shift) * (L - 1)(1 - eps) / 2 - offset`` with ``offset = 1/2`` for even L (0 for odd L),
    so ``round(bound(z))`` takes exactly the L integer values ``-(L // 2) .. (L - 1) // 2``; ``quantized =
    round_ste(bound(z)) / (L // 2)`` lies in [-1, 1] and the gradient flows straight through the rounding into the
    tanh. Level index ``j_i = round(bound(z_i)) + L_i // 2`` in ``[0, L_i)``; ``code = sum_i j_i * prod_{k<i} L_k``
    (channel 0 is the least significant digit). No auxiliary loss (``loss`` is 0), no parameters, no state: the
    level tables are non-persistent integer buffers, so the module survives casts and loads any state dict it saved.
    """

    _EPS = 1e-3  # keeps tanh's bound strictly inside the outermost rounding interval

    def __init__(self, levels: tuple[int, ...] | list[int], config: QuantizerConfig | None = None) -> None:
        super().__init__()
        levels = tuple(int(level) for level in levels)
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FiniteScalarQuantizer needs levels >= 2 per channel, got {levels}")
        self.config = config if config is not None else QuantizerConfig()
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = [math.prod(levels[:i]) for i in range(self.dim)]  # (d,) 1, L_0, L_0 L_1, ...
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)  # (d,) long
        self.register_buffer("_basis", torch.tensor(basis), persistent=False)  # (d,) long

    def _bound(self, flat: Tensor) -> Tensor:
        """(N, d) fp32 -> (N, d) in (-(L // 2) - 1/2, (L - 1) // 2 + 1/2): rounding gives exactly L values."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 - self._EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        # The shift centres z = 0 on (about) level 0 for even L; tan(offset / half_l) as in the paper's reference
        # code (~ atanh of it, and finite for L = 2, where offset / half_l > 1).
        shift = torch.tan(offset / half_l)
        return torch.tanh(flat + shift) * half_l - offset

    def codes_to_levels(self, codes: Tensor) -> Tensor:
        """Level indices (..., d) long in [0, L_i) of ``codes`` (...): the mixed-radix digits."""
        return torch.div(codes.long()[..., None], self._basis, rounding_mode="floor") % self._levels

    def levels_to_codes(self, level_index: Tensor) -> Tensor:
        """Codes (...) of level indices (..., d) in [0, L_i): inverse of :meth:`codes_to_levels`."""
        return (level_index.long() * self._basis).sum(dim=-1)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Quantized latents (B, d, t, h, w) fp32 in [-1, 1] of ``codes`` (B, t, h, w): what :meth:`forward` gives."""
        _check_codes(codes, self.codebook_size, type(self).__name__)
        half_width = torch.div(self._levels, 2, rounding_mode="floor")
        latents = (self.codes_to_levels(codes) - half_width).float() / half_width.float()  # (B, t, h, w, d)
        return latents.permute(0, 4, 1, 2, 3).contiguous()

    def latents_to_codes(self, z: Tensor) -> Tensor:
        """Codes (B, t, h, w) of ``z`` (B, d, t, h, w): those of :meth:`forward` without its statistics."""
        _check_latents(z, self.dim, type(self).__name__)
        b, _, t, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            rounded = self._bound(_flatten(z.float())).round()  # (N, d)
            level_index = rounded.long() + torch.div(self._levels, 2, rounding_mode="floor")
            return self.levels_to_codes(level_index).view(b, t, h, w)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` (B, d, t, h, w) with d = len(levels)."""
        _check_latents(z, self.dim, type(self).__name__)
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self._bound(_flatten(z.float()))  # (N, d)
            rounded = bounded.round()
            half_width = torch.div(self._levels, 2, rounding_mode="floor")
            codes = self.levels_to_codes(rounded.long() + half_width)  # (N,)
            quantized = (bounded + (rounded - bounded).detach()) / half_width.float()  # straight-through rounding
            usage, perplexity = _usage_stats(_code_counts(codes, self.codebook_size))
            zero = bounded.new_zeros(())
        b, _, t, h, w = z.shape
        stats = {
            "codebook_usage": usage,
            "perplexity": perplexity,
            "commitment_loss": zero,  # FSQ has no auxiliary losses; zeros keep the logged keys of every quantizer
            "codebook_loss": zero,
            "entropy_loss": zero,
        }
        return QuantizerOutput(_unflatten(quantized, z.shape).to(z.dtype), codes.view(b, t, h, w), zero, stats)


# --- continuous bottlenecks ----------------------------------------------------------------------------------------
class GaussianPosterior(NamedTuple):
    """The KL bottleneck's diagonal Gaussian q(z | x) = N(mean, exp(logvar)), each (B, D, t, h, w) fp32."""

    mean: Tensor
    logvar: Tensor  # clamped to [-30, 20] as in LDM


def gaussian_kl(posterior: GaussianPosterior) -> Tensor:
    """KL(q || N(0, I)) in nats per clip: 0.5 * sum(mean^2 + var - 1 - logvar) over (D, t, h, w), mean over B."""
    mean, logvar = posterior
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, D, t, h, w)
    return kl.flatten(1).sum(dim=1).mean()


def _continuous_stats(zero: Tensor, **terms: Tensor) -> dict[str, Tensor]:
    """The logged loss terms of a continuous bottleneck: the quantizers' loss keys at zero (no codebook, commitment
    or entropy) plus its own ``terms``; no ``codebook_usage`` / ``perplexity`` (no codes to count)."""
    return {"commitment_loss": zero, "codebook_loss": zero, "entropy_loss": zero,
            **{k: v.detach() for k, v in terms.items()}}


class IdentityBottleneck(nn.Module):
    """``quantizer="none"``: a plain autoencoder, the latents ``(B, D, t, h, w)`` pass through unchanged; loss 0."""

    def __init__(self, dim: int, config: QuantizerConfig | None = None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.config = config if config is not None else QuantizerConfig()
        self.dim = dim  # encoder output = decoder input channels

    def latents(self, z: Tensor) -> Tensor:
        """The decoder's latents of encoder output ``z`` (B, D, t, h, w): ``z`` itself."""
        _check_latents(z, self.dim, type(self).__name__)
        return z

    def forward(self, z: Tensor) -> QuantizerOutput:
        _check_latents(z, self.dim, type(self).__name__)
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z, None, zero, _continuous_stats(zero))


class GaussianBottleneck(nn.Module):
    """``quantizer="kl"``: the KL-regularised autoencoder of LDM / Stable Diffusion (Kingma & Welling's VAE posterior).

    The encoder predicts ``2 * dim`` channels, the mean and log-variance of q(z | x) (channels ``[:dim]`` and
    ``[dim:]``). Training samples ``z = mean + exp(logvar / 2) * eps`` (reparameterisation, so the gradient reaches
    the encoder); evaluation and :meth:`latents` take the mean. Loss: ``kl_weight * KL(q || N(0, I))``, the KL in
    nats per clip (:func:`gaussian_kl`), logged as ``stats["kl_loss"]`` unweighted. No parameters or buffers.
    """

    def __init__(self, dim: int, config: QuantizerConfig | None = None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.config = config if config is not None else QuantizerConfig()
        self.dim = dim  # decoder input channels; the encoder gives 2 * dim (mean, logvar)

    def posterior(self, z: Tensor) -> GaussianPosterior:
        """q(z | x) of encoder output ``z`` (B, 2 * dim, t, h, w), fp32."""
        _check_latents(z, 2 * self.dim, type(self).__name__)
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = z.float().chunk(2, dim=1)
            return GaussianPosterior(mean, logvar.clamp(-30.0, 20.0))

    def latents(self, z: Tensor) -> Tensor:
        """The decoder's latents at inference: the posterior mean (B, dim, t, h, w) in ``z``'s dtype."""
        return self.posterior(z).mean.to(z.dtype)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Sample (training) or take the mean (eval) of q(z | x) for encoder output ``z`` (B, 2 * dim, t, h, w)."""
        posterior = self.posterior(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = posterior.mean
            if self.training:
                latents = latents + torch.exp(0.5 * posterior.logvar) * torch.randn_like(latents)
            kl = gaussian_kl(posterior)
        stats = _continuous_stats(kl.new_zeros(()), kl_loss=kl)
        return QuantizerOutput(latents.to(z.dtype), None, self.config.kl_weight * kl, stats)


QUANTIZER_KINDS = ("vq", "lfq", "fsq", "none", "kl")
CONTINUOUS_KINDS = frozenset({"none", "kl"})  # no codes: encode gives latents, codebook_size does not apply


def build_quantizer(
    kind: Literal["vq", "lfq", "fsq", "none", "kl"], codebook_size: int, dim: int, config: QuantizerConfig | None = None
) -> nn.Module:
    """The quantizer named by ``kind``. ``"lfq"``: ``dim`` must equal log2(codebook_size). ``"fsq"``: the levels are
    ``config.fsq_levels_for(codebook_size)`` and ``dim`` must equal their number. ``"none"`` / ``"kl"``: continuous
    latents of ``dim`` channels (``codebook_size`` is ignored; kl reads ``2 * dim`` encoder channels)."""
    config = config if config is not None else QuantizerConfig()
    if kind == "none":
        return IdentityBottleneck(dim, config)
    if kind == "kl":
        return GaussianBottleneck(dim, config)
    if kind == "vq":
        return VectorQuantizer(codebook_size, dim, config)
    if kind == "lfq":
        quantizer = LookupFreeQuantizer(codebook_size, config)
        if dim != quantizer.dim:
            raise ValueError(f"lfq with codebook_size {codebook_size} needs latent dim log2(K) = {quantizer.dim}, got {dim}")
        return quantizer
    if kind == "fsq":
        quantizer = FiniteScalarQuantizer(config.fsq_levels_for(codebook_size), config)
        if dim != quantizer.dim:
            raise ValueError(f"fsq with levels {quantizer.levels} needs latent dim len(levels) = {quantizer.dim}, got {dim}")
        return quantizer
    raise ValueError(f"unknown quantizer kind {kind!r}; expected one of {', '.join(map(repr, QUANTIZER_KINDS))}")
