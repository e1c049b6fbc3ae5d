"""MaskedVideoTransformer: presets and parameter counts, shapes, BERT structure, tied output layer, save/load."""

from __future__ import annotations

import pytest
import torch

from magvit import MaskedVideoTransformer, TransformerConfig
from magvit.config import ConfigError


@pytest.mark.parametrize(("preset", "reference"), [("B", 87e6), ("L", 306e6)])
def test_preset_parameter_counts_match_magvit(preset, reference):
    config = TransformerConfig.preset(preset)
    with torch.device("meta"):  # counts parameters without allocating them
        model = MaskedVideoTransformer(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - reference) / reference < 0.03, count


def test_presets_sizes():
    b, large = TransformerConfig.preset("B"), TransformerConfig.preset("L")
    assert (b.num_layers, b.hidden_size, large.num_layers, large.hidden_size) == (12, 768, 24, 1024)
    assert b.dropout == 0.1 and b.hidden_act == "gelu_new"


def test_forward_shapes_and_bert_structure():
    config = TransformerConfig.preset("tiny", num_classes=5)
    model = MaskedVideoTransformer(config).eval()
    vocab = config.vocab
    assert config.vocab_size == vocab.size == 64 + 3 + 9 + 5
    assert config.max_length == 2 + 2 * 256
    ids = torch.randint(0, vocab.size, (3, config.max_length))
    logits = model(ids)
    assert logits.shape == (3, config.max_length, vocab.size)
    bert = model.bert
    # output layer tied to the token embedding, with its own bias
    assert bert.cls.predictions.decoder.weight is bert.bert.embeddings.word_embeddings.weight
    assert bert.cls.predictions.bias.shape == (vocab.size,)
    assert bert.bert.embeddings.position_embeddings.num_embeddings == config.max_length
    assert bert.config.hidden_act == "gelu_new" and bert.config.hidden_dropout_prob == 0.1
    # bidirectional: changing the last token changes the logits at the first position
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % vocab.size
    assert not torch.allclose(model(ids2)[:, 0], logits[:, 0])


def test_dropout_active_only_in_training():
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny"))
    ids = torch.randint(0, 64, (2, model.config.max_length))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    assert torch.allclose(model(ids), model(ids))


def test_save_and_load_round_trip(tmp_path):
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2)).eval()
    ids = torch.randint(0, 64, (2, model.config.max_length))
    model.save_pretrained(tmp_path / "export")
    loaded = MaskedVideoTransformer.from_pretrained(tmp_path / "export")
    assert loaded.config == model.config
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.bert.cls.predictions.decoder.weight is loaded.bert.bert.embeddings.word_embeddings.weight


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="divisible"):
        TransformerConfig.preset("tiny", hidden_size=65)
    with pytest.raises(ConfigError, match="token_grid"):
        TransformerConfig.preset("tiny", token_grid=(0, 4, 4))
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"L <= 514"):
        model(torch.zeros(1, 515, dtype=torch.long))
