"""Bidirectional masked video transformer: token ids -> logits, nothing more.

MAGVIT's transformer is a post-LN BERT (tanh GELU, learned absolute positions, dropout 0.1 on the hidden states;
none on the attention probabilities, so that SDPA runs its fused kernel) whose output layer is tied to the token
embedding and has its own bias; it is built here from ``transformers``' ``BertForMaskedLM``
(its prediction head is exactly dense -> GELU -> LayerNorm -> tied decoder + bias). Masking, conditioning and
decoding live in ``magvit/masking.py`` and ``magvit/sampling.py``.

Large codebooks (MAGVIT-v2's 2^18 LFQ codes) use token factorization (``token_factorization = F > 1``): a code is
``F`` sub-tokens of ``S = codebook_size ** (1/F)`` values (:class:`magvit.sequence.CodeFactorization`). Its input
embedding combines ``F`` sub-token embeddings (summed, or concatenated), the special tokens keep their own rows, and
``F`` output heads, tied to the sub-token embeddings, predict the sub-tokens: logits ``(B, L, F, S)``. The tables
hold ``F * S`` code rows instead of ``codebook_size`` (2 x 512 instead of 262144).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from .code_grids import check_grids
from .config import Config
from .sequence import CONDITIONINGS, CodeFactorization, SequenceLayout, TokenVocabulary
from .pretrained import PretrainedMixin
from .tasks import DEFAULT_TASKS, task


@dataclasses.dataclass
class TransformerConfig(Config):
    """Size and vocabulary of :class:`MaskedVideoTransformer`.

    The vocabulary (codebook + named special tokens, :class:`magvit.sequence.TokenVocabulary`) and the sequence
    length (:class:`magvit.sequence.SequenceLayout`) follow from ``codebook_size``, ``tasks``, ``num_classes``,
    ``token_grid`` and ``conditioning``. ``tasks`` is the model's task list (names of rows of
    ``magvit.tasks.TASKS``): its order fixes the task-token ids and the class tokens come after them, so rows added
    to the table later change no id of a saved model; a config.json without it (every export written before it
    was saved) gets ``DEFAULT_TASKS``, the list those exports were trained with.

    ``conditioning`` says where the condition tokens go (``magvit.masking``'s module docstring): ``"prefix"`` (a
    prefix of ``N`` condition tokens, sequence ``2 + 2N``; what every export without the key has) or ``"interior"``
    (MAGVIT's COMMIT: in the masked video slots of the task's condition region, sequence ``2 + N``). Interior
    conditioning is for pixel-condition tasks, class and unconditional; a sketch has no region, so an interior
    model's task list must not hold ``sketch`` (train it with a prefix model).

    ``cond_frames`` records the frame-prediction given-frame counts of the token shards the model was trained on
    (the trainer fills it in from their ``meta.json``; empty: not recorded, as in older exports): generate and
    evaluate warn when asked for another count. It changes no weight and no sequence.

    ``token_factorization`` > 1 splits each code into that many sub-tokens (the codebook must be a power of two
    whose bits divide evenly, e.g. 2^18 -> 2 x 2^9); ``factor_embedding`` says how the sub-token embeddings form
    the code's input embedding: ``"sum"`` (each ``hidden_size`` wide) or ``"concat"`` (each ``hidden_size / F``
    wide).

    ``top_grid`` (a ``hierarchy=2`` tokenizer's top code grid ``(t, h/2, w/2)``; ``None``, what every export without
    the key has: one grid) puts the top grid's tokens before the bottom grid's in the prefix and the video
    (``magvit.code_grids``): the model trains the top stage and the bottom stage given the top, and decodes the top
    first, then the bottom.
    """

    codebook_size: int = 1024
    token_grid: tuple[int, int, int] = (4, 16, 16)  # (t, h, w) of the tokenizer's code grid
    top_grid: tuple[int, int, int] | None = None  # two code grids (VQ-VAE-2): the top grid, modelled first
    num_classes: int = 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    conditioning: str = "prefix"  # "prefix" | "interior" (MAGVIT's COMMIT), see above
    cond_frames: tuple[int, ...] = ()  # frame prediction's given-frame counts it was trained on (empty: unknown)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    # Dropout on the attention probabilities forces SDPA off its fused CPU kernel onto the math path, which
    # materialises the (B, heads, L, L) probabilities and draws a mask over them: 4.8x the fused kernel's time for
    # the attention of a B layer at L = 1026, forward + backward (BENCHMARKS.md, "Achieved FLOP/s"). 0 keeps the
    # fused kernel; the hidden states keep MAGVIT's dropout 0.1.
    attention_dropout: float = 0.0
    # The tanh approximation of GELU, as in BERT / MAGVIT: "gelu_pytorch_tanh" is torch's one fused kernel,
    # "gelu_new" (what earlier exports say, kept when they load) the same function in 8 elementwise ops (2x slower).
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"
    token_factorization: int = 1  # sub-tokens per code (MAGVIT-v2: 2 for 2^18 codes); 1 = one softmax over codes
    factor_embedding: str = "sum"  # "sum" | "concat": how the sub-token embeddings combine

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
        self.top_grid = check_grids(self.token_grid, self.top_grid)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        self.tasks = tuple(self.tasks)
        self.cond_frames = tuple(int(n) for n in self.cond_frames)
        if any(n < 1 for n in self.cond_frames):
            raise ValueError(f"cond_frames must be given-frame counts >= 1, got {list(self.cond_frames)}")
        TokenVocabulary(self.codebook_size, self.num_classes, self.tasks)  # raises for a repeated or unknown task
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        sketches = [name for name in self.tasks if task(name).condition == "sketch"]
        if self.conditioning == "interior" and sketches:
            raise ValueError(f"conditioning 'interior' has no slot for a sketch condition: drop {sketches} from "
                             f"tasks (e.g. tasks={[n for n in self.tasks if n not in sketches]})")
        if self.factor_embedding not in ("sum", "concat"):
            raise ValueError(f"factor_embedding must be 'sum' or 'concat', got {self.factor_embedding!r}")
        CodeFactorization(self.codebook_size, self.token_factorization)  # raises if the codebook cannot be split
        if self.factor_embedding == "concat" and self.hidden_size % self.token_factorization:
            raise ValueError(f"factor_embedding 'concat' needs hidden_size {self.hidden_size} divisible by "
                             f"token_factorization {self.token_factorization}")

    @property
    def factorization(self) -> CodeFactorization:
        return CodeFactorization(self.codebook_size, self.token_factorization)

    @property
    def vocab(self) -> TokenVocabulary:
        return TokenVocabulary(self.codebook_size, self.num_classes, self.tasks)

    @property
    def layout(self) -> SequenceLayout:
        return SequenceLayout(self.token_grid, self.conditioning, self.top_grid)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def max_length(self) -> int:
        return self.layout.length


def _bert_config(config: TransformerConfig, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    bert_config = BertConfig(
        vocab_size=vocab_size,
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
        pad_token_id=pad_token_id,
    )
    bert_config._attn_implementation = config.attn_implementation
    return bert_config


class SubTokenHeads(nn.Module):
    """BERT's prediction head (dense -> GELU -> LayerNorm) and ``F`` decoders tied to the sub-token embeddings,
    each with its own bias: hidden ``(B, L, hidden)`` -> logits ``(B, L, F, S)``.

    Summed embeddings: head ``i`` scores the whole hidden state against sub-table ``i``; concatenated: against
    slice ``i`` of it, the slice that sub-token ``i``'s embedding fills. Either way the sum of a code's sub-token
    logits is the tied logit ``<h, E[c]>`` of its combined embedding ``E[c]``.
    """

    def __init__(self, bert_config, code_embedding: nn.Embedding, factorization: CodeFactorization, concat: bool):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.factors, self.sub_vocab, self.concat = factorization.num_factors, factorization.sub_vocab_size, concat
        self.transform = BertPredictionHeadTransform(bert_config)
        self.weight = code_embedding.weight  # tied: the same Parameter, as BERT ties its decoder
        self.bias = nn.Parameter(torch.zeros(self.factors, self.sub_vocab))
        nn.init.normal_(self.transform.dense.weight, std=bert_config.initializer_range)  # BERT's initialisation
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.transform(hidden)  # (B, L, hidden)
        table = self.weight.view(self.factors, self.sub_vocab, -1)  # (F, S, width)
        if self.concat:
            logits = torch.einsum("blfd,fsd->blfs", hidden.unflatten(-1, (self.factors, -1)), table)
        else:
            logits = torch.einsum("blh,fsh->blfs", hidden, table)
        return logits + self.bias  # (B, L, F, S)


class FactorizedMaskedLM(nn.Module):
    """BERT over factorised codes: ``input_ids (B, L) -> sub-token logits (B, L, F, S)``.

    ``bert.embeddings.word_embeddings`` holds the special tokens only (row ``id - codebook_size``; the pad row is
    zero, as BERT's padding row is in the flat model); ``code_embedding`` holds the ``F * S`` sub-token rows
    (sub-token ``i`` of value ``v`` is row ``i * S + v``); ``heads`` (:class:`SubTokenHeads`) are tied to them.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        from transformers import BertModel

        vocab, self.factorization = config.vocab, config.factorization
        self.concat = config.factor_embedding == "concat"
        f, s = self.factorization.num_factors, self.factorization.sub_vocab_size
        bert_config = _bert_config(config, vocab.size - vocab.codebook_size, vocab.pad_token - vocab.codebook_size)
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        self.code_embedding = nn.Embedding(f * s, config.hidden_size // f if self.concat else config.hidden_size)
        nn.init.normal_(self.code_embedding.weight, std=config.initializer_range)
        self.heads = SubTokenHeads(bert_config, self.code_embedding, self.factorization, self.concat)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(B, L, hidden)``: combined sub-token rows at codes, own rows at special tokens."""
        k = self.factorization.codebook_size
        f, s = self.factorization.num_factors, self.factorization.sub_vocab_size
        is_code = input_ids < k  # (B, L)
        sub = self.factorization.split(input_ids.clamp(max=k - 1))  # (B, L, F)
        rows = self.code_embedding(sub + s * torch.arange(f, device=input_ids.device))  # (B, L, F, width)
        codes = rows.flatten(-2) if self.concat else rows.sum(dim=-2)  # (B, L, hidden)
        special = self.bert.embeddings.word_embeddings((input_ids - k).clamp(min=0))  # (B, L, hidden)
        return torch.where(is_code[..., None], codes, special)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.heads(self.bert(inputs_embeds=self.embed(input_ids)).last_hidden_state)  # (B, L, F, S)


class MaskedVideoTransformer(nn.Module, PretrainedMixin):
    """``forward(input_ids (B, L)) -> logits (B, L, vocab_size)`` with a post-LN BERT encoder; with
    ``token_factorization = F > 1`` the logits are per sub-token, ``(B, L, F, S)`` (:class:`FactorizedMaskedLM`)."""

    config_class = TransformerConfig
    model_type = "masked_video_transformer"
    # The masking it was trained with (``masking.MaskingConfig.to_dict()``, set by the trainer), kept in config.json:
    # held-out scoring masks the same way (``masking.recorded_masking``). None: an export older than the record.
    # The decoding settings chosen for it on held-out clips (``sampling.recorded_decoding``): what generate and
    # evaluate use unless a flag says otherwise. None: none chosen (the built-in ``sampling.DECODING_DEFAULTS``).
    records = ("training_masking", "decoding")
    training_masking: dict[str, Any] | None = None
    decoding: dict[str, Any] | None = None

    def __init__(self, config: TransformerConfig):
        super().__init__()
        from transformers import BertForMaskedLM

        self.config = config
        if config.token_factorization > 1:
            self.bert = FactorizedMaskedLM(config)
        else:
            self.bert = BertForMaskedLM(_bert_config(config, config.vocab_size, config.vocab.pad_token))

    @property
    def vocab(self) -> TokenVocabulary:
        return self.config.vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, vocab_size)`` (factorised: ``(B, L, F, S)``) for every position of ``input_ids``
        ``(B, L)``."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be (B, L) with L <= {self.config.max_length}, "
                             f"got {tuple(input_ids.shape)}")
        # All positions attend to all others (no padding inside a sequence), so no attention mask is passed.
        if isinstance(self.bert, FactorizedMaskedLM):
            return self.bert(input_ids)
        return self.bert(input_ids=input_ids).logits
