"""Bidirectional masked video transformer: token ids -> logits, nothing more.

MAGVIT's transformer is a post-LN BERT (tanh GELU, learned absolute positions, dropout 0.1) whose output layer is
tied to the token embedding and has its own bias; it is built here from ``transformers``' ``BertForMaskedLM``
(its prediction head is exactly dense -> GELU -> LayerNorm -> tied decoder + bias). Masking, conditioning and
decoding live in ``magvit/masking.py`` and ``magvit/sampling.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from .config import Config
from .masking import TASKS, SequenceLayout, TokenVocabulary
from .pretrained import PretrainedMixin


@dataclasses.dataclass
class TransformerConfig(Config):
    """Size and vocabulary of :class:`MaskedVideoTransformer`.

    The vocabulary (codebook + named special tokens, :class:`magvit.masking.TokenVocabulary`) and the sequence
    length (:class:`magvit.masking.SequenceLayout`) follow from ``codebook_size``, ``num_classes`` and
    ``token_grid``.
    """

    codebook_size: int = 1024
    token_grid: tuple[int, int, int] = (4, 16, 16)  # (t, h, w) of the tokenizer's code grid
    num_classes: int = 0
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu_new"  # tanh approximation of GELU, as in BERT / MAGVIT
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(codebook_size=64, token_grid=(4, 8, 8), hidden_size=64, num_layers=2, num_heads=2,
                     intermediate_size=256),
        "B": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        "L": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    }

    def __post_init__(self) -> None:
        if len(self.token_grid) != 3 or min(self.token_grid) < 1:
            raise ValueError(f"token_grid must be three positive ints (t, h, w), got {self.token_grid}")
        self.token_grid = tuple(int(x) for x in self.token_grid)  # type: ignore[assignment]
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def vocab(self) -> TokenVocabulary:
        return TokenVocabulary(self.codebook_size, self.num_classes, TASKS)

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(self.token_grid)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def max_length(self) -> int:
        return self.layout.length


class MaskedVideoTransformer(nn.Module, PretrainedMixin):
    """``forward(input_ids (B, L)) -> logits (B, L, vocab_size)`` with a post-LN BERT encoder."""

    config_class = TransformerConfig
    model_type = "masked_video_transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        self.config = config
        bert_config = BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_length,
            type_vocab_size=1,  # no segments: the sequence layout is carried by the special tokens
            layer_norm_eps=config.layer_norm_eps,
            initializer_range=config.initializer_range,
            tie_word_embeddings=True,
            pad_token_id=config.vocab.pad_token,
        )
        bert_config._attn_implementation = config.attn_implementation
        self.bert = BertForMaskedLM(bert_config)

    @property
    def vocab(self) -> TokenVocabulary:
        return self.config.vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, vocab_size)`` for every position of ``input_ids`` ``(B, L)``."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be (B, L) with L <= {self.config.max_length}, "
                             f"got {tuple(input_ids.shape)}")
        # All positions attend to all others (no padding inside a sequence), so no attention mask is passed.
        return self.bert(input_ids=input_ids).logits
