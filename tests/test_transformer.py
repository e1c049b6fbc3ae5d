"""MaskedVideoTransformer: presets and parameter counts, shapes, BERT structure, tied output layer, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from magvit import MaskedVideoTransformer, TransformerConfig, tasks
from magvit.config import ConfigError
from magvit.tasks import DEFAULT_TASKS, Task


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
    assert b.dropout == 0.1 and b.attention_dropout == 0.0 and b.hidden_act == "gelu_pytorch_tanh"


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
    assert bert.config.hidden_act == "gelu_pytorch_tanh" and bert.config.hidden_dropout_prob == 0.1
    # bidirectional: changing the last token changes the logits at the first position
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % vocab.size
    assert not torch.allclose(model(ids2)[:, 0], logits[:, 0])


def test_training_attention_runs_on_the_fused_kernel():
    """With the default attention dropout (0) a training-mode forward runs on SDPA's fused kernel, equal to the
    math path; attention-probability dropout has no fused CPU kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = TransformerConfig.preset("tiny", dropout=0.0)
    model = MaskedVideoTransformer(config).train()
    ids = torch.randint(0, 64, (2, config.max_length))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises where the fused kernel cannot run
        fused = model(ids)
    with sdpa_kernel(SDPBackend.MATH):
        math_path = model(ids)
    torch.testing.assert_close(fused, math_path, atol=1e-5, rtol=1e-5)
    dropped = MaskedVideoTransformer(config.replace(attention_dropout=0.1)).train()
    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="not support non-zero dropout"):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dropped(ids)


def test_gelu_kernel_is_the_tanh_gelu_of_old_exports():
    """``gelu_pytorch_tanh`` (the default) and ``gelu_new`` (what older exports say, kept when they load) are the
    same function."""
    from transformers.activations import get_activation

    x = torch.linspace(-8, 8, 10001)
    torch.testing.assert_close(get_activation("gelu_pytorch_tanh")(x), get_activation("gelu_new")(x))


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


# --- token factorization (MAGVIT-v2: a large codebook as F sub-tokens) ----------------------------------------------


def _factorised(mode: str, **overrides) -> TransformerConfig:
    # 256 codes = 2 sub-tokens of 16 values
    return TransformerConfig.preset("tiny", codebook_size=256, token_factorization=2, factor_embedding=mode,
                                    **overrides)


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_factorised_forward_shapes_embedding_and_tied_heads(mode):
    config = _factorised(mode, num_classes=3)
    model = MaskedVideoTransformer(config).eval()
    lm, vocab = model.bert, config.vocab
    assert config.vocab_size == 256 + 3 + 9 + 3  # the token ids are unchanged: codes, then special tokens
    width = 64 if mode == "sum" else 32
    assert lm.code_embedding.weight.shape == (2 * 16, width)
    assert lm.bert.embeddings.word_embeddings.num_embeddings == vocab.size - 256  # special tokens only
    assert lm.heads.weight is lm.code_embedding.weight and lm.heads.bias.shape == (2, 16)
    ids = torch.randint(0, vocab.size, (3, config.max_length))
    logits = model(ids)
    assert logits.shape == (3, config.max_length, 2, 16)
    # a code's input embedding combines the rows of its sub-tokens (c >> 4, c & 15); special tokens have their own
    codes = torch.tensor([[0, 17, 255, vocab.mask_token, vocab.class_token(2)]])
    emb, table = lm.embed(codes)[0], lm.code_embedding.weight
    rows = [(table[c >> 4], table[16 + (c & 15)]) for c in (0, 17, 255)]
    combined = [torch.cat(r) if mode == "concat" else r[0] + r[1] for r in rows]
    assert torch.allclose(emb[:3], torch.stack(combined))
    special = lm.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb[3], special[0]) and torch.equal(emb[4], special[vocab.class_token(2) - 256])
    # summed over its sub-tokens, a code's logit is the tied logit <h, E[c]> of its combined embedding (+ biases)
    with torch.no_grad():
        hidden = lm.heads.transform(lm.bert(inputs_embeds=lm.embed(ids)).last_hidden_state)  # (B, L, H)
        all_codes = lm.embed(torch.arange(256)[None])[0]  # (256, H)
        tied = hidden @ all_codes.T + (lm.heads.bias[0, :, None] + lm.heads.bias[1, None, :]).reshape(256)
    joint = (logits[..., 0, :, None] + logits[..., 1, None, :]).flatten(-2)  # (B, L, 256)
    assert torch.allclose(joint, tied, atol=1e-4)
    # bidirectional
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 256
    assert not torch.allclose(model(ids2)[:, 0], logits[:, 0])


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_factorised_model_learns_a_fixed_batch(mode):
    from magvit.masking import MaskingConfig, make_training_batch, masked_token_loss

    torch.manual_seed(0)
    config = _factorised(mode, token_grid=(1, 4, 4), dropout=0.0, attention_dropout=0.0)
    model = MaskedVideoTransformer(config)
    batch = {"codes": torch.randint(0, 256, (4, 1, 4, 4))}
    tb = make_training_batch(batch, config.vocab, MaskingConfig(), mask_ratio=0.5,
                             generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = masked_token_loss(model(tb.input_ids), tb.labels, tb.loss_mask, 256, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2 * math.log(16), rel=0.1)  # two uniform sub-tokens at initialisation
    assert losses[-1] < 0.5 * losses[0], losses


def test_b_preset_with_a_2_18_codebook_factorised_vs_flat():
    counts = {}
    for factors in (1, 2):
        config = TransformerConfig.preset("B", codebook_size=2**18, token_factorization=factors)
        with torch.device("meta"):
            counts[factors] = sum(p.numel() for p in MaskedVideoTransformer(config).parameters())
    print(f"B transformer, 2^18 codebook: flat {counts[1] / 1e6:.1f}M, factorised 2 x 2^9 {counts[2] / 1e6:.1f}M")
    hidden, specials, codes = 768, config.vocab.size - 2**18, 2**18
    # flat: (codes + specials) embedding rows and output biases; factorised: specials rows + 2 x 512 sub-token
    # rows and biases
    assert counts[1] - counts[2] == (codes + specials) * (hidden + 1) - specials * hidden - 2 * 512 * (hidden + 1)
    assert counts[1] > 280e6 and abs(counts[2] - 87e6) / 87e6 < 0.03  # ~the paper's 87M B model


def test_factorised_save_load_and_old_exports(tmp_path):
    model = MaskedVideoTransformer(_factorised("concat", num_classes=2)).eval()
    ids = torch.randint(0, 256, (2, model.config.max_length))
    model.save_pretrained(tmp_path / "factorised")
    loaded = MaskedVideoTransformer.from_pretrained(tmp_path / "factorised")
    assert loaded.config == model.config and torch.equal(loaded(ids), model(ids))
    assert loaded.bert.heads.weight is loaded.bert.code_embedding.weight
    # an export written before the factorization options existed loads as the flat model it was
    flat = MaskedVideoTransformer(TransformerConfig.preset("tiny")).eval()
    flat.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["config"]["token_factorization"], meta["config"]["factor_embedding"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    old = MaskedVideoTransformer.from_pretrained(tmp_path / "old")
    ids = torch.randint(0, 64, (2, flat.config.max_length))
    assert old.config.token_factorization == 1 and torch.equal(old(ids), flat(ids))


def test_factorised_model_decodes_with_fixed_tokens_kept():
    from magvit.pipeline import generate_codes
    from magvit.sequence import build_sequence
    from magvit.sampling import iterative_decode

    torch.manual_seed(0)
    model = MaskedVideoTransformer(_factorised("sum", token_grid=(2, 4, 4))).eval()
    vocab, layout = model.vocab, model.config.layout
    video = torch.full((2, 2, 4, 4), vocab.mask_token)
    video[:, 0, :2] = torch.randint(0, 256, (2, 2, 4))  # some video tokens fixed too
    prefix = torch.randint(0, 256, (2, 2, 4, 4))
    tokens = build_sequence(vocab, layout, torch.full((2,), vocab.task_token("frame_prediction")),
                            torch.full((2,), vocab.unconditional_token), prefix, video)
    out = iterative_decode(model, tokens, mask_token=vocab.mask_token, codebook_size=256, steps=4,
                           generator=torch.Generator().manual_seed(0))
    fixed = tokens != vocab.mask_token
    assert torch.equal(out[fixed], tokens[fixed])
    assert bool(((out[~fixed] >= 0) & (out[~fixed] < 256)).all())
    codes = generate_codes(model, "unconditional", None, num_samples=2, steps=3, guidance_scale=1.0, seed=0)
    assert codes.shape == (2, 2, 4, 4) and bool(((codes >= 0) & (codes < 256)).all())


def test_factorization_config_errors():
    with pytest.raises(ConfigError, match="power-of-two"):
        TransformerConfig.preset("tiny", codebook_size=1000, token_factorization=2)
    with pytest.raises(ConfigError, match="power-of-two"):
        TransformerConfig.preset("tiny", codebook_size=2**18, token_factorization=4)  # 18 bits into 4 groups
    with pytest.raises(ConfigError, match="factor_embedding"):
        TransformerConfig.preset("tiny", codebook_size=256, token_factorization=2, factor_embedding="mean")
    with pytest.raises(ConfigError, match="divisible by token_factorization"):
        TransformerConfig.preset("tiny", codebook_size=64, token_factorization=3, factor_embedding="concat")
    assert TransformerConfig.preset("tiny", codebook_size=1000).factorization.sub_vocab_size == 1000


def test_evaluate_reports_the_summed_sub_token_nll():
    from magvit.evaluate import MaskedTokenEvaluation
    from magvit.sequence import code_nll
    from magvit.masking import MaskingConfig, make_training_batch

    torch.manual_seed(0)
    model = MaskedVideoTransformer(_factorised("sum", token_grid=(1, 4, 4))).eval()
    batch = {"codes": torch.randint(0, 256, (3, 1, 4, 4))}
    ev = MaskedTokenEvaluation(model, ["unconditional"], seed=4)
    ev.update(batch)
    summary = ev.summary()
    # the same masking (same seed), scored by hand: mean over masked tokens of -log p_0(c >> 4) - log p_1(c & 15)
    tb = make_training_batch(batch, model.vocab, MaskingConfig(tasks=["unconditional"], cond_dropout_prob=0.0,
                                                               unmasked_weight=0.0),
                             generator=torch.Generator().manual_seed(4))
    scored = tb.loss_mask > 0
    with torch.no_grad():
        log_p = torch.log_softmax(model(tb.input_ids), dim=-1)[scored]  # (M, 2, 16)
    target = tb.labels[scored]
    by_hand = -(log_p[:, 0].gather(1, (target >> 4)[:, None]) + log_p[:, 1].gather(1, (target & 15)[:, None]))
    assert summary["masked_tokens"] == int(scored.sum())
    assert summary["masked_token_nll"] == pytest.approx(by_hand.mean().item(), rel=1e-5)
    assert by_hand.mean().item() == pytest.approx(code_nll(model(tb.input_ids)[scored], target, 256).mean().item(),
                                                  rel=1e-5)


# --- the model's task list (config.json) ---------------------------------------------------------------------------

OLD_EXPORT = Path(__file__).parent / "fixtures" / "transformer_without_tasks"
NEW_TASK = Task("outpaint_wide", "outpaint", "video", region="wide", frames="all", area="horizontal",
                fill="constant")


def _expected_logits_match(model) -> bool:
    from safetensors.torch import load_file

    expected = load_file(str(OLD_EXPORT / "expected_logits.safetensors"))  # recorded when the export was written
    with torch.no_grad():
        return torch.allclose(model(expected["input_ids"]), expected["logits"], atol=1e-6, rtol=1e-5)


def test_export_without_a_task_list_loads_with_its_ids():
    """``fixtures/transformer_without_tasks`` was written before config.json held the task list: it loads with the
    default list and the ids it was saved with (its logits for every task / class token are the recorded ones)."""
    assert "tasks" not in json.loads((OLD_EXPORT / "config.json").read_text())["config"]
    model = MaskedVideoTransformer.from_pretrained(OLD_EXPORT)
    vocab = model.vocab
    assert model.config.tasks == DEFAULT_TASKS and model.class_names == ["cat", "dog"]
    # [16 codes][mask][pad][uncond][9 tasks][2 classes]
    assert [vocab.task_token(t) for t in DEFAULT_TASKS] == list(range(19, 28))
    assert (vocab.class_token(0), vocab.class_token(1), vocab.size) == (28, 29, 30)
    assert _expected_logits_match(model)


def test_export_records_its_training_masking(tmp_path):
    """An export keeps the masking it was trained with (config.json's ``training_masking``) for held-out scoring;
    one written before the record reads as the trainer's defaults."""
    from magvit.masking import MaskingConfig, recorded_masking

    model = MaskedVideoTransformer(TransformerConfig.preset("tiny"))
    trained = MaskingConfig(schedule="linear", two_grid_masking="stages", cond_dropout_prob=0.2)
    model.training_masking = trained.to_dict()
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["training_masking"]["schedule"] == "linear"
    assert recorded_masking(MaskedVideoTransformer.from_pretrained(tmp_path / "model")) == trained
    old = MaskedVideoTransformer.from_pretrained(OLD_EXPORT)
    assert old.training_masking is None and recorded_masking(old) == MaskingConfig()
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    for record, error, message in ((["cosine"], ValueError, "training_masking must be a JSON object"),
                                   ({"schedule": "cubic"}, ConfigError, "training_masking: .*schedule: 'cubic'")):
        (tmp_path / "model" / "config.json").write_text(json.dumps({**meta, "training_masking": record}))
        with pytest.raises(error, match=message):
            recorded_masking(MaskedVideoTransformer.from_pretrained(tmp_path / "model"))


def test_new_task_rows_change_no_id_of_a_saved_model(tmp_path, monkeypatch):
    saved = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2))
    saved.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["config"]["tasks"] == list(DEFAULT_TASKS)
    before = saved.vocab
    ids = torch.randint(0, before.size, (2, saved.config.max_length))
    # A row added to the table, first and last: neither the saved model nor an export without a list moves.
    for table in ((NEW_TASK, *tasks.TASKS), (*tasks.TASKS, NEW_TASK)):
        monkeypatch.setattr(tasks, "TASKS", table)
        loaded = MaskedVideoTransformer.from_pretrained(tmp_path / "model")
        after = loaded.vocab
        assert after == before and after.size == before.size
        assert [after.task_token(t) for t in DEFAULT_TASKS] == [before.task_token(t) for t in DEFAULT_TASKS]
        assert after.class_token(1) == before.class_token(1)
        assert torch.equal(loaded(ids), saved.eval()(ids))
        assert _expected_logits_match(MaskedVideoTransformer.from_pretrained(OLD_EXPORT))
        # a new model that lists the new task gets its token after the others, and the classes after it
        grown = TransformerConfig.preset("tiny", num_classes=2, tasks=[*DEFAULT_TASKS, "outpaint_wide"]).vocab
        assert grown.task_token("outpaint_wide") == before.class_token(0)
        assert grown.class_token(0) == before.class_token(0) + 1 and grown.size == before.size + 1


def test_task_list_is_checked():
    with pytest.raises(ConfigError, match="unknown task 'deblur'"):
        TransformerConfig.preset("tiny", tasks=["frame_prediction", "deblur"])
    with pytest.raises(ConfigError, match="distinct"):
        TransformerConfig.preset("tiny", tasks=["class", "class"])
    with pytest.raises(ConfigError, match="distinct"):
        TransformerConfig.preset("tiny", tasks=[])
    small = TransformerConfig.preset("tiny", tasks=["unconditional", "frame_prediction"], num_classes=1)
    assert small.vocab.task_token("frame_prediction") == 64 + 3 + 1 and small.vocab.size == 64 + 3 + 2 + 1


# --- interior COMMIT conditioning (config.json's "conditioning") --------------------------------------------------

INTERIOR_TASKS = [t for t in DEFAULT_TASKS if t != "sketch"]


def test_interior_conditioning_sequence_and_config(tmp_path):
    config = TransformerConfig.preset("tiny", conditioning="interior", tasks=INTERIOR_TASKS)
    assert config.max_length == 2 + 256 and config.layout.video == slice(2, 258)
    model = MaskedVideoTransformer(config).eval()
    assert model.bert.bert.embeddings.position_embeddings.num_embeddings == 2 + 256
    assert model(torch.randint(0, 64, (1, 2 + 256))).shape == (1, 258, config.vocab_size)
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["config"]["conditioning"] == "interior"
    assert MaskedVideoTransformer.from_pretrained(tmp_path / "model").config.conditioning == "interior"
    assert TransformerConfig.preset("tiny").max_length == 2 + 2 * 256  # prefix: the default
    with pytest.raises(ConfigError, match="no slot for a sketch"):
        TransformerConfig.preset("tiny", conditioning="interior")  # the default list holds the sketch task
    with pytest.raises(ConfigError, match="conditioning must be one of"):
        TransformerConfig.preset("tiny", conditioning="suffix")


def test_export_without_conditioning_loads_as_prefix():
    assert "conditioning" not in json.loads((OLD_EXPORT / "config.json").read_text())["config"]
    model = MaskedVideoTransformer.from_pretrained(OLD_EXPORT)
    assert model.config.conditioning == "prefix" and model.config.max_length == 2 + 2 * 4
    assert _expected_logits_match(model)


def test_interior_model_generates_with_its_condition_refilled():
    from magvit.pipeline import generate_codes
    from magvit.conditions import latent_condition_region
    from magvit.cli import UsageError

    torch.manual_seed(0)
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", token_grid=(2, 4, 4), conditioning="interior",
                                                            tasks=INTERIOR_TASKS)).eval()
    region = latent_condition_region("frame_prediction", (2, 4, 4), (8, 16, 16), causal=False)  # latent frame 0
    condition = torch.randint(0, 64, (1, 2, 4, 4))
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    codes = generate_codes(model, "frame_prediction", condition, num_samples=2, steps=3, seed=0,
                           condition_region=region)
    hook.remove()
    assert codes.shape == (2, 2, 4, 4) and bool(((codes >= 0) & (codes < 64)).all())
    assert seen[0].shape == (2, 2 + 32)
    first = seen[0][:, 2:].reshape(2, 2, 4, 4)  # step 1: every slot masked, the region shows the condition
    assert torch.equal(first[:, 0], condition[:, 0].expand(2, -1, -1))
    assert bool((first[:, 1] == model.vocab.mask_token).all())
    with pytest.raises(UsageError, match="condition region"):
        generate_codes(model, "frame_prediction", condition, steps=2, seed=0)
    with pytest.raises(UsageError, match="unknown task 'sketch'"):
        generate_codes(model, "sketch", condition, steps=2, seed=0)
    assert generate_codes(model, "unconditional", None, steps=2, seed=0, guidance_scale=1.0).shape == (1, 2, 4, 4)


def test_interior_model_in_the_pipeline_sees_the_condition_video_codes():
    from magvit import TokenizerConfig, VideoPipeline, VideoTokenizer

    torch.manual_seed(0)
    tokenizer = VideoTokenizer(TokenizerConfig.preset("tiny")).eval()  # 8x32x32 -> 4x8x8, 2 frames per latent frame
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", conditioning="interior",
                                                            tasks=INTERIOR_TASKS)).eval()
    pipe = VideoPipeline(tokenizer, model)
    video = torch.rand(3, 8, 32, 32) * 2 - 1
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    out = pipe("frame_prediction", video, num_cond_frames=3, num_samples=1, steps=2, seed=0)
    hook.remove()
    assert out.shape == (1, 3, 8, 32, 32)
    codes = tokenizer.encode(pipe.prepare_condition("frame_prediction", video, 3)[None])  # (1, 4, 8, 8)
    first = seen[0][0, 2:].reshape(4, 8, 8)  # 3 given frames: latent frame 0 wholly, frame 1 partly -> both
    assert torch.equal(first[:2], codes[0, :2]) and bool((first[2:] == model.vocab.mask_token).all())
