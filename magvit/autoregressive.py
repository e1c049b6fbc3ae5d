"""The autoregressive prior of VQ-VAE / VQGAN over the tokenizer's codes: token ids -> next-token logits.

VQGAN (Esser et al. 2021) models ``p(s_i | s_<i, c)`` with a causal transformer over the codes in raster order, a
spatial condition's codes placed before the image codes and the loss taken on the image codes only. Here the
sequence is the masked transformer's prefix layout (:class:`magvit.sequence.SequenceLayout`, the same vocabulary
:class:`magvit.sequence.TokenVocabulary`)::

    [task token][class or unconditional token][prefix: t*h*w condition codes][video: t*h*w codes, raster (t, h, w)]

so one token shard trains either prior, and a prefix is any task's condition (a COMMIT condition video, a sketch, or
all pad for class / unconditional). The network is ``transformers``' GPT-2 (pre-LN, learned absolute positions,
tanh GELU, output layer tied to the token embedding), sized like the masked transformer's presets. The mask token of
the vocabulary is never used.

The next-token loss on the video positions (:func:`next_token_loss`, :func:`video_logits`) lives here; the training
sequences (the task, condition and classifier-free guidance dropout drawn as for the masked transformer, every video
code visible) are ``magvit.prior_training.training_sequence``; decoding with a key/value cache is
``magvit/autoregressive_sampling.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from . import tasks as _tasks
from .code_grids import check_grids
from .config import Config, require_finite
from .sequence import SequenceLayout, TokenVocabulary, code_nll
from .pretrained import PretrainedMixin
from .tasks import DEFAULT_TASKS
from .transformer import TransformerConfig


_PRESET_KEYS = ("codebook_size", "token_grid", "hidden_size", "num_layers", "num_heads", "intermediate_size")


@dataclasses.dataclass
class AutoregressiveConfig(Config):
    """Size and vocabulary of :class:`AutoregressiveTransformer`.

    ``codebook_size``, ``token_grid``, ``num_classes`` and ``tasks`` fix the vocabulary and the sequence exactly as
    for :class:`magvit.transformer.TransformerConfig` (``tasks``: the model's task list, whose order fixes the
    task-token ids; a config.json without it gets ``DEFAULT_TASKS``). The presets are the masked transformer's
    sizes (hidden size, layers, heads, MLP width). ``top_grid`` (two code grids, ``magvit.code_grids``; ``None`` in
    every export without the key) puts the top grid's codes before the bottom grid's, so raster order models the
    top first and the bottom given the top.
    """

    codebook_size: int = 1024
    token_grid: tuple[int, int, int] = (4, 16, 16)  # (t, h, w) of the tokenizer's code grid
    top_grid: tuple[int, int, int] | None = None  # two code grids (VQ-VAE-2): the top grid, generated first
    num_classes: int = 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu_new"  # tanh approximation of GELU, as in GPT-2
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"

    # the masked transformer's presets, their sizes only (any option of the BERT prior stays there)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        name: {key: value for key, value in preset.items() if key in _PRESET_KEYS}
        for name, preset in TransformerConfig.PRESETS.items()}

    def __post_init__(self) -> None:
        if len(self.token_grid) != 3 or min(self.token_grid) < 1:
            raise ValueError(f"token_grid must be three positive ints (t, h, w), got {self.token_grid}")
        self.token_grid = tuple(int(x) for x in self.token_grid)  # type: ignore[assignment]
        self.top_grid = check_grids(self.token_grid, self.top_grid)
        if min(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size) < 1:
            raise ValueError("hidden_size, num_layers, num_heads and intermediate_size must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        require_finite(self, ("dropout", "attention_dropout", "layer_norm_eps", "initializer_range"))
        if not (0 <= self.dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ValueError("dropout and attention_dropout must be in [0, 1)")
        self.tasks = tuple(self.tasks)
        TokenVocabulary(self.codebook_size, self.num_classes, self.tasks)  # raises for a repeated or unknown task

    @property
    def vocab(self) -> TokenVocabulary:
        return TokenVocabulary(self.codebook_size, self.num_classes, self.tasks)

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(self.token_grid, top_grid=self.top_grid)

    @property
    def conditioning(self) -> str:
        """Always ``"prefix"`` (``sequence.PriorConfig``): the condition codes precede the video codes."""
        return "prefix"

    @property
    def cond_frames(self) -> tuple[int, ...]:
        """Frame prediction's trained given-frame counts (``sequence.PriorConfig``): not recorded, so unknown."""
        return ()

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def max_length(self) -> int:
        return self.layout.length


def _gpt2_config(config: AutoregressiveConfig):
    from transformers import GPT2Config

    gpt2_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_length,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=config.intermediate_size,
        activation_function=config.hidden_act,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=True,
        # no BOS / EOS (a sequence starts with its task token and has a fixed length) and no padding: the pad token
        # of the vocabulary is content (the prefix of a task without a condition), attended to like any other
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    gpt2_config._attn_implementation = config.attn_implementation
    return gpt2_config


class AutoregressiveTransformer(nn.Module, PretrainedMixin):
    """``forward(input_ids (B, L)) -> logits (B, L, vocab_size)``: position ``i``'s logits predict token ``i + 1``
    from tokens ``<= i`` (a causal GPT-2 decoder). :meth:`forward_cached` is the same network fed a few new
    positions at a time with the key/value cache of the earlier ones (decoding)."""

    config_class = AutoregressiveConfig
    model_type = "autoregressive_transformer"

    def __init__(self, config: AutoregressiveConfig):
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.config = config
        self.gpt = GPT2LMHeadModel(_gpt2_config(config))

    @property
    def vocab(self) -> TokenVocabulary:
        return self.config.vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, L, vocab_size)`` for every position of ``input_ids`` ``(B, L)``."""
        self._check_length(input_ids, 0)
        return self.gpt(input_ids=input_ids, use_cache=False).logits

    def forward_cached(self, input_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Logits ``(B, n, vocab_size)`` of ``n`` new positions ``input_ids`` ``(B, n)`` that follow the positions
        held by ``cache`` (``None``: none, the sequence starts here), and the cache extended by them."""
        past = 0 if cache is None else cache.get_seq_length()
        self._check_length(input_ids, past)
        # positional cache and a tuple out: the argument is `past_key_values` before transformers 5, `cache` after
        logits, cache = self.gpt(input_ids, cache, use_cache=True, return_dict=False)[:2]
        return logits, cache

    def _check_length(self, input_ids: torch.Tensor, past: int) -> None:
        if input_ids.dim() != 2 or past + input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be (B, L) with {past} + L <= {self.config.max_length}, "
                             f"got {tuple(input_ids.shape)}")


# --- training sequences and the next-token loss --------------------------------------------------------------------


@dataclasses.dataclass
class AutoregressiveObjectiveConfig(Config):
    """Options of ``prior_training.training_sequence`` and :func:`next_token_loss`."""

    tasks: list[str] | None = None  # None: every task of the model that the token shards support
    cond_dropout_prob: float = 0.1  # classifier-free guidance: drop the condition / class
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is an empty list, which trains nothing: name the tasks to train, or null "
                             "for every task of the model that the token shards carry")
        for name in self.tasks or []:
            _tasks.task(name)  # raises naming the known tasks
        require_finite(self, ("cond_dropout_prob", "label_smoothing"))
        if not 0 <= self.cond_dropout_prob <= 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("objective: need 0 <= cond_dropout_prob <= 1 and 0 <= label_smoothing < 1")


def video_logits(logits: torch.Tensor, layout: SequenceLayout, codebook_size: int) -> torch.Tensor:
    """The code logits ``(B, N, K)`` that predict the ``N`` video positions, from the logits ``(B, L, V)`` of a whole
    sequence: position ``i`` predicts token ``i + 1``, so they are those of positions ``video.start - 1 ...
    video.stop - 2`` (the last prefix token predicts the first code). Special tokens are never targets."""
    return logits[:, layout.video.start - 1:layout.video.stop - 1, :codebook_size]


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, layout: SequenceLayout, codebook_size: int,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the video codes of ``input_ids`` ``(B, L)`` given everything before them, under the
    model's ``logits`` ``(B, L, V)`` of that sequence (VQGAN's loss, on the image codes only)."""
    predicting = video_logits(logits, layout, codebook_size)  # (B, N, K)
    targets = input_ids[:, layout.video]  # (B, N)
    return code_nll(predicting.reshape(-1, codebook_size), targets.reshape(-1), codebook_size, label_smoothing).mean()
