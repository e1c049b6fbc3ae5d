"""Mask schedule, vocabulary, COMMIT condition videos, training batches and the masked-token loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from magvit import tasks
from magvit.tasks import CONDITION_TASKS
from magvit.sequence import (CodeFactorization, IGNORE_INDEX, NO_LABEL, SequenceLayout, TokenVocabulary, code_nll,
                             factor_logits, predicted_codes)
from magvit.masking import (SCHEDULES, MaskingConfig, check_training_batch, make_training_batch, mask_schedule,
                            masked_token_loss, random_mask, training_tasks)
from magvit.tasks import TASK_NAMES
from magvit.conditions import build_condition_video, condition_region, latent_condition_region, latent_condition_regions

GRID = (2, 4, 4)
N = 32


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_monotone_with_endpoints(name):
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    g = mask_schedule(r, name)
    assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0, abs=1e-12)
    assert bool((g[1:] <= g[:-1]).all())
    assert bool(((g >= 0) & (g <= 1)).all())
    # float in, float out, same value as the tensor path
    assert mask_schedule(0.3, name) == pytest.approx(float(mask_schedule(torch.tensor(0.3, dtype=torch.float64), name)))


def test_schedule_known_values_and_errors():
    assert mask_schedule(0.5, "cosine") == pytest.approx(math.cos(math.pi / 4))
    assert mask_schedule(0.5, "linear") == pytest.approx(0.5)
    assert mask_schedule(0.5, "square") == pytest.approx(0.75)
    assert mask_schedule(0.5) == mask_schedule(0.5, "cosine")  # cosine is the default
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_schedule(0.5, "cubic")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_schedule(1.5)


def test_vocabulary_tokens_are_distinct_and_after_codebook():
    vocab = TokenVocabulary(codebook_size=16, num_classes=3)
    special = [vocab.mask_token, vocab.pad_token, vocab.unconditional_token]
    special += [vocab.task_token(t) for t in TASK_NAMES] + [vocab.class_token(c) for c in range(3)]
    assert len(set(special)) == len(special) == vocab.size - 16
    assert min(special) == 16 and max(special) == vocab.size - 1
    assert vocab.class_token(NO_LABEL) == vocab.unconditional_token
    assert vocab.class_tokens(torch.tensor([2, -1])).tolist() == [vocab.class_token(2), vocab.unconditional_token]
    with pytest.raises(ValueError, match="out of range"):
        vocab.class_token(3)
    with pytest.raises(ValueError, match="unknown task"):
        vocab.task_token("deblur")


@pytest.mark.parametrize("task", CONDITION_TASKS)
def test_condition_video_for_every_task(task):
    torch.manual_seed(0)
    video = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    cond = build_condition_video(video, task)
    assert cond.shape == video.shape
    known = condition_region(task, 8, 16, 16)
    # Known pixels are copied exactly; unknown ones are built from the known ones only.
    assert torch.equal(cond[..., known], video[..., known])
    assert 0 < int(known.sum()) < known.numel()
    unknown = ~known
    expected_fraction = {"frame_prediction": 1 / 8, "interpolation": 2 / 8, "outpaint_central": 1 / 4,
                         "outpaint_vertical": 1 / 2, "outpaint_horizontal": 1 / 2, "inpaint_central": 3 / 4}[task]
    assert known.float().mean().item() == pytest.approx(expected_fraction)
    if task == "frame_prediction":
        assert torch.equal(cond[:, :, 1:], video[:, :, :1].expand(-1, -1, 7, -1, -1))
    elif task == "interpolation":  # a linear blend of the first and the last frame
        blend = torch.arange(8.0).div(7).view(1, 1, 8, 1, 1)
        assert torch.allclose(cond, video[:, :, :1] + blend * (video[:, :, 7:] - video[:, :, :1]), atol=1e-6)
    elif task.startswith("outpaint"):  # the known box's edge pixels, replicated
        assert torch.equal(build_condition_video(cond, task), cond)  # padding a padded video changes nothing
        rows, cols = known[0].any(dim=1).nonzero()[:, 0], known[0].any(dim=0).nonzero()[:, 0]
        assert torch.equal(cond[..., 0, 0], video[..., rows[0], cols[0]])  # corner <- corner of the box
        assert torch.equal(cond[..., -1, :], cond[..., rows[-1], :])  # last rows <- the box's last row
    else:
        assert bool((cond[..., unknown] == 0).all())
    # an unbatched (3, T, H, W) video gives the same result
    assert torch.equal(build_condition_video(video[0], task), cond[0])


def test_condition_regions_geometry():
    central = condition_region("outpaint_central", 1, 8, 8)[0]
    assert central[2:6, 2:6].all() and int(central.sum()) == 16
    vertical = condition_region("outpaint_vertical", 1, 8, 8)[0]
    assert vertical[:, 2:6].all() and not vertical[:, :2].any()
    horizontal = condition_region("outpaint_horizontal", 1, 8, 8)[0]
    assert horizontal[2:6, :].all() and not horizontal[:2].any()
    inpaint = condition_region("inpaint_central", 1, 8, 8)[0]
    assert torch.equal(inpaint, ~central)
    multi = condition_region("frame_prediction", 8, 4, 4, num_cond_frames=3)
    assert multi[:3].all() and not multi[3:].any()


def test_linear_blend_and_edge_fills_on_tiny_videos():
    """Interpolation blends linearly between the given frames, outpainting replicates the known box's edge pixels
    (MAGVIT's official condition videos), to the exact value."""
    video = torch.rand(3, 5, 2, 2) * 2 - 1
    video[:, 0], video[:, 4] = -1.0, 1.0
    cond = build_condition_video(video, "interpolation")
    assert torch.equal(cond, torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 5, 1, 1).expand(3, 5, 2, 2))
    grid = torch.arange(16.0).view(4, 4).expand(3, 2, 4, 4)  # (3, T=2, 4, 4): the middle half is rows/cols 1-2
    expected = {
        "outpaint_central": [[5, 5, 6, 6], [5, 5, 6, 6], [9, 9, 10, 10], [9, 9, 10, 10]],
        "outpaint_vertical": [[1, 1, 2, 2], [5, 5, 6, 6], [9, 9, 10, 10], [13, 13, 14, 14]],
        "outpaint_horizontal": [[4, 5, 6, 7], [4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]],
    }
    for task, values in expected.items():
        assert torch.equal(build_condition_video(grid, task), torch.tensor(values, dtype=torch.float32).expand_as(grid))
    inpaint = build_condition_video(grid, "inpaint_central")  # unchanged: the hole is 0
    assert torch.equal(inpaint[0, 0], torch.where(condition_region("inpaint_central", 1, 4, 4)[0], grid[0, 0], 0.0))
    assert [tasks.task(t).fill for t in CONDITION_TASKS] == ["nearest_frame", "linear_blend", "edge", "edge", "edge",
                                                             "constant"]


def test_fills_need_a_region_they_can_fill():
    with pytest.raises(ValueError, match="needs area 'all'"):
        tasks.Task("blend", "blend", "video", frames="ends", area="central", fill="linear_blend")
    with pytest.raises(ValueError, match="fill 'edge'"):
        tasks.Task("pad", "pad", "video", frames="all", area="outside_central", fill="edge")
    with pytest.raises(ValueError, match="fill 'edge'"):
        tasks.Task("pad", "pad", "video", frames="first", area="central", fill="edge")


def test_condition_errors():
    video = torch.zeros(3, 4, 8, 8)
    with pytest.raises(ValueError, match="not a pixel-space condition task"):
        build_condition_video(video, "sketch")
    with pytest.raises(ValueError, match="num_cond_frames"):
        build_condition_video(video, "frame_prediction", num_cond_frames=4)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        build_condition_video(torch.zeros(4, 8, 8), "interpolation")


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_random_mask_hits_ratio(ratio):
    masks = random_mask(1000, torch.full((4,), ratio), torch.Generator().manual_seed(1))
    expected = min(1000, max(1, math.floor(ratio * 1000)))
    assert masks.sum(dim=1).tolist() == [expected] * 4
    # positions differ between rows (random, not a fixed prefix)
    if 0 < expected < 1000:
        assert not torch.equal(masks[0], masks[1])


def _batch(b=6, labels=(0, 1, -1, 2, -1, 1)):
    g = torch.Generator().manual_seed(0)
    items = {"codes": torch.randint(0, 16, (b, *GRID), generator=g), "label": torch.tensor(labels[:b])}
    for task in CONDITION_TASKS:
        items[f"cond.{task}"] = torch.randint(0, 16, (b, *GRID), generator=g)
    items["sketch_codes"] = torch.randint(0, 16, (b, *GRID), generator=g)
    return items


def test_training_batch_layout_and_requested_ratio():
    vocab = TokenVocabulary(16, num_classes=3)
    layout = SequenceLayout(GRID)
    batch = _batch()
    out = make_training_batch(batch, vocab, MaskingConfig(cond_dropout_prob=0.0, unmasked_weight=0.25), mask_ratio=0.5,
                              generator=torch.Generator().manual_seed(0))
    ids, labels, weights = out
    assert ids.shape == labels.shape == weights.shape == (6, layout.length)
    video_in = ids[:, layout.video]
    masked = video_in == vocab.mask_token
    assert masked.sum(dim=1).tolist() == [N // 2] * 6  # exactly the requested ratio
    codes = batch["codes"].reshape(6, N)
    assert torch.equal(video_in[~masked], codes[~masked])  # unmasked tokens are the ground truth
    assert torch.equal(labels[:, layout.video], codes)
    assert bool((labels[:, : layout.video.start] == IGNORE_INDEX).all())
    assert bool((weights[:, : layout.video.start] == 0).all())
    assert torch.equal(weights[:, layout.video], torch.where(masked, 1.0, 0.25))
    # prefix and class slots agree with the task chosen for each example
    task_of = {vocab.task_token(t): t for t in TASK_NAMES}
    for i in range(6):
        task = task_of[int(ids[i, 0])]
        prefix = ids[i, layout.prefix]
        if task in CONDITION_TASKS:
            assert torch.equal(prefix, batch[f"cond.{task}"][i].reshape(N))
        elif task == "sketch":
            assert torch.equal(prefix, batch["sketch_codes"][i].reshape(N))
        else:
            assert bool((prefix == vocab.pad_token).all())
        label = int(batch["label"][i])
        expected_class = vocab.unconditional_token if task == "unconditional" else vocab.class_token(label)
        assert int(ids[i, 1]) == expected_class


def test_training_batch_schedule_ratios_and_task_mix():
    vocab = TokenVocabulary(16, num_classes=3)
    batch = {k: v.repeat(50, *[1] * (v.dim() - 1)) for k, v in _batch().items()}  # 300 examples
    ids, _, _ = make_training_batch(batch, vocab, MaskingConfig(cond_dropout_prob=0.0),
                                    generator=torch.Generator().manual_seed(3))
    fraction = (ids[:, SequenceLayout(GRID).video] == vocab.mask_token).float().mean(dim=1)
    # ratio = cos(pi/2 u), u ~ U(0,1): mean 2/pi
    assert fraction.mean().item() == pytest.approx(2 / math.pi, abs=0.05)
    tasks = {int(t) for t in ids[:, 0]}
    assert tasks == {vocab.task_token(t) for t in TASK_NAMES}
    # unlabelled examples never get the class task
    unlabelled = batch["label"] < 0
    assert not bool((ids[unlabelled, 0] == vocab.task_token("class")).any())


def test_training_batch_condition_dropout_and_determinism():
    vocab = TokenVocabulary(16, num_classes=3)
    batch = {k: v.repeat(50, *[1] * (v.dim() - 1)) for k, v in _batch().items()}
    masking = MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.3)
    a = make_training_batch(batch, vocab, masking, generator=torch.Generator().manual_seed(5))
    b = make_training_batch(batch, vocab, masking, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    layout = SequenceLayout(GRID)
    dropped_prefix = (a.input_ids[:, layout.prefix] == vocab.pad_token).all(dim=1).float().mean().item()
    labelled = batch["label"] >= 0
    dropped_class = (a.input_ids[labelled, 1] == vocab.unconditional_token).float().mean().item()
    assert dropped_prefix == pytest.approx(0.3, abs=0.1)
    assert dropped_class == pytest.approx(0.3, abs=0.1)
    none = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0))
    assert not bool((none.input_ids[:, layout.prefix] == vocab.pad_token).all(dim=1).any())


def test_training_batch_errors():
    vocab = TokenVocabulary(16, num_classes=3)
    batch = {"codes": torch.randint(0, 16, (2, *GRID)), "label": torch.tensor([-1, -1])}
    with pytest.raises(ValueError, match="cond.interpolation"):
        make_training_batch(batch, vocab, MaskingConfig(tasks=["interpolation"]))
    with pytest.raises(ValueError, match="unknown task"):
        make_training_batch(batch, vocab, MaskingConfig(tasks=["deblur"]))
    # Checks of the tensors' values are check_training_batch's: make_training_batch never waits for the device.
    with pytest.raises(ValueError, match="no label"):
        check_training_batch(batch, vocab, tasks=["class"])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        check_training_batch({"codes": torch.full((1, *GRID), 16)}, vocab)
    with pytest.raises(ValueError, match="cond.outpaint_central.*\\[0, 16\\)"):
        check_training_batch({**_batch(), "cond.outpaint_central": torch.full((6, *GRID), -1)}, vocab)
    with pytest.raises(ValueError, match=r"class ids must be in \[-1, 3\)"):
        check_training_batch({**batch, "label": torch.tensor([3, -1])}, vocab)
    check_training_batch(_batch(), vocab)  # a valid batch passes
    # unchecked, an unlabelled example of a class-only batch trains with the unconditional class token
    ids = make_training_batch(batch, vocab, MaskingConfig(tasks=["class"])).input_ids
    assert bool((ids[:, 0] == vocab.task_token("class")).all() and (ids[:, 1] == vocab.unconditional_token).all())


def test_masked_token_loss_matches_reference_and_ignores_special_logits():
    torch.manual_seed(0)
    vocab = TokenVocabulary(16, num_classes=3)
    ids, labels, weights = make_training_batch(_batch(), vocab, MaskingConfig(unmasked_weight=0.5), mask_ratio=0.5)
    logits = torch.randn(*ids.shape, vocab.size)
    loss = masked_token_loss(logits, labels, weights, 16, 0.0)
    video = SequenceLayout(GRID).video
    ce = F.cross_entropy(logits[:, video, :16].reshape(-1, 16), labels[:, video].reshape(-1), reduction="none")
    w = weights[:, video].reshape(-1)
    assert loss.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    # huge logits on special tokens change nothing: the loss sees the codebook only
    logits[..., 16:] = 1e4
    assert masked_token_loss(logits, labels, weights, 16, 0.0).item() == pytest.approx(loss.item(), rel=1e-5)
    # label smoothing raises the loss of a confident correct prediction
    perfect = F.one_hot(labels.clamp_min(0), vocab.size).float() * 20
    assert masked_token_loss(perfect, labels, weights, 16, 0.0).item() < 1e-6
    assert masked_token_loss(perfect, labels, weights, 16, label_smoothing=0.1).item() > 0.5


def test_training_batch_from_token_shard_items():
    """Collated ``TokenShardDataset`` items: int32 codes, an ``index`` key, labels as a tensor."""
    vocab = TokenVocabulary(16, num_classes=3)
    items = _batch()
    items = {k: (v.to(torch.int32) if k != "label" else v) for k, v in items.items()}
    items["index"] = torch.arange(6)
    ids, labels, weights = make_training_batch(items, vocab, MaskingConfig(),
                                               generator=torch.Generator().manual_seed(0))
    assert ids.dtype == labels.dtype == torch.long
    assert torch.equal(labels[:, SequenceLayout(GRID).video], items["codes"].long().reshape(6, N))


# --- token factorization (MAGVIT-v2: a 2^18 code as two 2^9 sub-tokens) --------------------------------------------


def test_code_factorization_is_a_bijection_with_known_bits():
    f = CodeFactorization(2**18, 2)
    assert f.sub_vocab_size == 512
    codes = torch.arange(2**18)
    sub = f.split(codes)  # (2^18, 2)
    assert torch.equal(sub[:, 0], codes >> 9) and torch.equal(sub[:, 1], codes & 511)
    assert torch.equal(f.merge(sub), codes)
    # every (sub_0, sub_1) pair is the split of exactly one code
    pairs = torch.cartesian_prod(torch.arange(512), torch.arange(512))
    assert torch.equal(f.split(f.merge(pairs)), pairs)
    three = CodeFactorization(64, 3)  # 6 bits -> 3 x 2 bits
    assert three.sub_vocab_size == 4
    assert three.split(torch.tensor([0b10_01_11])).tolist() == [[2, 1, 3]]
    assert torch.equal(three.merge(three.split(torch.arange(64))), torch.arange(64))
    one = CodeFactorization(1000, 1)  # no factorization: any codebook, identity
    assert one.sub_vocab_size == 1000 and torch.equal(one.split(torch.arange(1000))[:, 0], torch.arange(1000))


@pytest.mark.parametrize(("codebook_size", "factors"), [(1000, 2), (2**18, 4), (2, 2), (64, 0)])
def test_code_factorization_rejects_uneven_splits(codebook_size, factors):
    with pytest.raises(ValueError, match="sub-tokens|>= 1"):
        CodeFactorization(codebook_size, factors)


def test_flat_loss_is_bit_identical_to_the_unfactorised_formula():
    """The flat path of ``masked_token_loss`` is the formula it had before factorization, to the last bit."""
    torch.manual_seed(1)
    vocab = TokenVocabulary(16, num_classes=3)
    ids, labels, weights = make_training_batch(_batch(), vocab, MaskingConfig(unmasked_weight=0.3), mask_ratio=0.5)
    logits = torch.randn(*ids.shape, vocab.size)
    for smoothing in (0.0, 0.1):
        valid = labels != IGNORE_INDEX
        ce = F.cross_entropy(logits[valid][:, :16].float(), labels[valid], reduction="none", label_smoothing=smoothing)
        w = weights[valid].float()
        before = (ce * w).sum() / w.sum().clamp_min(1e-8)
        assert torch.equal(masked_token_loss(logits, labels, weights, 16, smoothing), before)


def test_factorised_loss_is_the_joint_code_nll():
    torch.manual_seed(2)
    vocab = TokenVocabulary(16, num_classes=3)  # 16 codes = 2 sub-tokens of 4
    ids, labels, weights = make_training_batch(_batch(), vocab, MaskingConfig(unmasked_weight=0.5), mask_ratio=0.5)
    logits = torch.randn(*ids.shape, 2, 4)  # (B, L, F, S)
    loss = masked_token_loss(logits, labels, weights, 16, 0.0)
    # reference: the softmax over all 16 codes of the joint logit l_0[c >> 2] + l_1[c & 3]
    video = SequenceLayout(GRID).video
    joint = (logits[:, video, 0, :, None] + logits[:, video, 1, None, :]).reshape(-1, 16)  # (M, 16)
    ce = F.cross_entropy(joint, labels[:, video].reshape(-1), reduction="none")
    w = weights[:, video].reshape(-1)
    assert loss.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    # the joint's argmax is the merge of the sub-token argmaxes
    assert torch.equal(predicted_codes(logits[:, video], 16).reshape(-1), joint.argmax(-1))
    # a confident correct prediction costs nothing, label smoothing (per sub-token) makes it cost
    sub = CodeFactorization(16, 2).split(labels.clamp_min(0))  # (B, L, 2)
    perfect = F.one_hot(sub, 4).float() * 20
    assert masked_token_loss(perfect, labels, weights, 16, 0.0).item() < 1e-6
    smoothed = masked_token_loss(perfect, labels, weights, 16, label_smoothing=0.1).item()
    per_factor = F.cross_entropy(perfect[:, video, 0].reshape(-1, 4), sub[:, video, 0].reshape(-1),
                                 label_smoothing=0.1).item()
    assert smoothed == pytest.approx(2 * per_factor, rel=1e-5)  # summed over the two sub-tokens


def test_factor_logits_shapes_and_errors():
    flat = torch.randn(2, 5, 16 + 7)
    assert torch.equal(factor_logits(flat, 16), flat[..., :16].unsqueeze(-2))
    factored = torch.randn(2, 5, 2, 4)
    assert factor_logits(factored, 16) is factored
    assert code_nll(factored[0], torch.tensor([0, 5, 10, 15, 3]), 16).shape == (5,)
    with pytest.raises(ValueError, match="neither a flat"):
        factor_logits(torch.randn(2, 5, 2, 3), 16)  # 3**2 != 16


# --- make_training_batch, pinned -----------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


def _pinned_batch(b, labels, conds=True, sketch=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = {"codes": torch.randint(0, 16, (b, *GRID), generator=g), "label": torch.tensor(labels)}
    if conds:
        for task in ("frame_prediction", "interpolation", "outpaint_central", "outpaint_vertical",
                     "outpaint_horizontal", "inpaint_central"):  # the pixel-space tasks of the recording
            items[f"cond.{task}"] = torch.randint(0, 16, (b, *GRID), generator=g)
    if sketch:
        items["sketch_codes"] = torch.randint(0, 16, (b, *GRID), generator=g)
    return items


# (batch, make_training_batch options, seed) -> outputs recorded in fixtures/training_batches.safetensors
PINNED = {
    "all_tasks": (dict(b=24, labels=[0, 1, -1, 2, -1, 1] * 4), dict(), 0),
    "dropout": (dict(b=40, labels=[0, -1, 2, 1, -1] * 8),
                dict(tasks=["frame_prediction", "class", "sketch"], cond_dropout_prob=0.3), 5),
    "fixed_ratio": (dict(b=12, labels=[2, -1, 0] * 4), dict(mask_ratio=0.5, unmasked_weight=0.25,
                                                             cond_dropout_prob=0.0), 7),
    "no_conditions": (dict(b=10, labels=[-1] * 5 + [1] * 5, conds=False, sketch=False),
                      dict(schedule="exponential"), 11),
    "unlabelled_class_mix": (dict(b=16, labels=[-1] * 16, conds=False),
                             dict(tasks=["class", "unconditional", "sketch"], schedule="linear"), 13),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_training_batch_is_pinned_for_a_fixed_seed(case):
    """The same generator state gives the very batch the first implementation gave, and consumes as many draws
    (exact resume replays the training RNG)."""
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURES / "training_batches.safetensors"))
    batch_kwargs, options, seed = PINNED[case]
    options = dict(options)
    mask_ratio = options.pop("mask_ratio", None)  # per call; the rest are the MaskingConfig's
    g = torch.Generator().manual_seed(seed)
    ids, labels, weights = make_training_batch(_pinned_batch(**batch_kwargs), TokenVocabulary(16, num_classes=3),
                                               MaskingConfig(**options), generator=g, mask_ratio=mask_ratio)
    assert torch.equal(ids, expected[f"{case}.input_ids"].long())
    assert torch.equal(labels, expected[f"{case}.labels"].long())
    assert torch.equal(weights, expected[f"{case}.loss_mask"])
    assert torch.equal(torch.rand(4, generator=g), expected[f"{case}.next_draw"])


def test_training_batch_reads_no_tensor_value_on_the_host():
    """On the ``meta`` device tensors have no values: every host sync (``.item()``, ``bool(t)``, boolean indexing,
    a device-to-host copy) raises there, so a batch built from meta tensors proves the per-batch path has none."""
    vocab = TokenVocabulary(16, num_classes=3)
    for masking, ratio in ((MaskingConfig(), None), (MaskingConfig(tasks=["class", "sketch"]), 0.3),
                           (MaskingConfig(tasks=["unconditional"]), None)):
        batch = {k: v.to("meta") for k, v in _batch().items()}
        out = make_training_batch(batch, vocab, masking, generator=torch.Generator().manual_seed(0), mask_ratio=ratio)
        assert all(t.device.type == "meta" and t.shape == (6, SequenceLayout(GRID).length) for t in out)


# --- the task table ------------------------------------------------------------------------------------------------


def test_task_table_rows_and_cli_lookup():
    assert tasks.TASK_NAMES == tasks.DEFAULT_TASKS == TASK_NAMES  # today's table is the default list, in its order
    assert CONDITION_TASKS == tuple(t.name for t in tasks.TASKS if t.shard_key == f"cond.{t.name}")
    assert tasks.cli_names() == ("frame_prediction", "interpolation", "outpaint", "inpaint", "sketch", "class",
                                 "unconditional")
    assert tasks.cli_regions("outpaint") == ("central", "vertical", "horizontal") and tasks.cli_regions("inpaint") == ()
    assert tasks.from_cli("outpaint", "vertical").name == "outpaint_vertical"
    assert tasks.from_cli("inpaint", "vertical").name == "inpaint_central"  # one row: no region to choose
    with pytest.raises(ValueError, match="--region of outpaint must be one of central, vertical, horizontal"):
        tasks.from_cli("outpaint", "diagonal")
    with pytest.raises(ValueError, match="unknown task 'deblur'"):
        tasks.from_cli("deblur")
    sketch, label, uncond = tasks.task("sketch"), tasks.task("class"), tasks.task("unconditional")
    assert (sketch.shard_key, label.shard_key, uncond.shard_key) == ("sketch_codes", None, None)
    assert label.needs_label and not sketch.needs_label and sketch.uses_label and not uncond.uses_label
    with pytest.raises(ValueError, match="expected one of"):
        tasks.Task("blur", "blur", "video", frames="all", area="all", fill="blur")
    with pytest.raises(ValueError, match="'video' tasks only"):
        tasks.Task("blur", "blur", "sketch", fill="constant")


def test_a_new_task_is_one_table_row(monkeypatch):
    """A row with known kinds of region and fill is all a task needs: condition video, training batches, CLI."""
    wide = tasks.Task("outpaint_wide", "outpaint", "video", region="wide", frames="all", area="horizontal",
                      fill="edge")
    monkeypatch.setattr(tasks, "TASKS", (*tasks.TASKS, wide))
    assert torch.equal(condition_region("outpaint_wide", 2, 8, 8), condition_region("outpaint_horizontal", 2, 8, 8))
    video = torch.rand(3, 2, 8, 8) * 2 - 1
    assert torch.equal(build_condition_video(video, "outpaint_wide"),
                       build_condition_video(video, "outpaint_horizontal"))
    assert tasks.from_cli("outpaint", "wide") is wide and "wide" in tasks.cli_regions("outpaint")
    vocab = TokenVocabulary(16, num_classes=3, tasks=(*tasks.DEFAULT_TASKS, "outpaint_wide"))
    batch = {**_batch(), "cond.outpaint_wide": torch.randint(0, 16, (6, *GRID))}
    ids = make_training_batch(batch, vocab, MaskingConfig(tasks=["outpaint_wide"], cond_dropout_prob=0.0)).input_ids
    assert bool((ids[:, 0] == vocab.task_token("outpaint_wide")).all())
    assert torch.equal(ids[:, SequenceLayout(GRID).prefix], batch["cond.outpaint_wide"].reshape(6, N))
    # by default a model trains on every task of its list whose condition the batch carries
    chosen = make_training_batch({k: v.repeat(20, *[1] * (v.dim() - 1)) for k, v in batch.items()}, vocab,
                                 MaskingConfig(), generator=torch.Generator().manual_seed(0)).input_ids[:, 0]
    assert {int(t) for t in chosen} == {vocab.task_token(t) for t in vocab.tasks}
    old = TokenVocabulary(16, num_classes=3)  # a model of the old list does not train on it
    assert "outpaint_wide" not in {t.name for t in training_tasks(batch, old)}
    with pytest.raises(ValueError, match="unknown task 'outpaint_wide'"):
        make_training_batch(batch, old, MaskingConfig(tasks=["outpaint_wide"]))


# --- interior COMMIT conditioning (MAGVIT's official layout: no prefix) -------------------------------------------


def test_latent_condition_region_from_the_pixel_region():
    # non-causal, 4 frames and 4x4 pixels per slot: one given frame of four makes latent frame 0 a condition
    fp = latent_condition_region("frame_prediction", (4, 4, 4), (16, 16, 16), causal=False)
    assert fp[0].all() and not fp[1:].any()
    interp = latent_condition_region("interpolation", (4, 4, 4), (16, 16, 16), causal=False)
    assert interp[[0, 3]].all() and not interp[1:3].any()
    # causal: frame 0 alone is latent frame 0, frames 1-4 are latent frame 1, ..., frame 16 is in latent frame 4
    causal = latent_condition_region("frame_prediction", (5, 4, 4), (17, 16, 16), causal=True)
    assert causal[0].all() and not causal[1:].any()
    five = latent_condition_region("frame_prediction", (5, 4, 4), (17, 16, 16), causal=True, num_cond_frames=5)
    assert five[:2].all() and not five[2:].any()
    ends = latent_condition_region("interpolation", (5, 4, 4), (17, 16, 16), causal=True)
    assert ends[[0, 4]].all() and not ends[1:4].any()
    # spatially the pixel box at latent resolution: the middle half of a 4x4 grid
    central = latent_condition_region("outpaint_central", (2, 4, 4), (8, 16, 16), causal=False)
    assert torch.equal(central, condition_region("outpaint_central", 2, 4, 4))
    inpaint = latent_condition_region("inpaint_central", (2, 4, 4), (8, 16, 16), causal=False)
    assert torch.equal(inpaint, ~central)
    # a slot whose pixel block is only partly known is no condition: 10 pixels, 5 per slot, known 2..7
    assert not latent_condition_region("outpaint_central", (1, 2, 2), (1, 10, 10), causal=False).any()
    regions = latent_condition_regions(tasks.DEFAULT_TASKS, (2, 4, 4), (8, 16, 16), causal=False)
    assert sorted(regions) == sorted(CONDITION_TASKS)
    with pytest.raises(ValueError, match="do not map"):
        latent_condition_region("frame_prediction", (4, 4, 4), (17, 16, 16), causal=False)  # 17 = 4 x 4 + 1
    with pytest.raises(ValueError, match="latent grid"):
        latent_condition_region("frame_prediction", (4, 3, 4), (16, 16, 16), causal=False)


INTERIOR_TASKS = tuple(t for t in tasks.DEFAULT_TASKS if t != "sketch")


def _interior(batch, vocab, generator=None, **options):
    regions = latent_condition_regions(vocab.tasks, GRID, (8, 16, 16), causal=False)
    return make_training_batch(batch, vocab, MaskingConfig(**options), generator=generator, conditioning="interior",
                               condition_regions=regions), regions


def test_interior_training_batch_puts_condition_tokens_in_the_masked_region_slots():
    vocab = TokenVocabulary(16, num_classes=3, tasks=INTERIOR_TASKS)
    batch = {k: v.repeat(10, *[1] * (v.dim() - 1)) for k, v in _batch().items() if k != "sketch_codes"}  # 60
    layout = SequenceLayout(GRID, "interior")
    assert layout.length == 2 + N and layout.video == slice(2, 2 + N) and layout.prefix == slice(2, 2)
    (ids, labels, weights), regions = _interior(batch, vocab, cond_dropout_prob=0.0, unmasked_weight=0.5,
                                                generator=torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == weights.shape == (60, 2 + N)
    codes = batch["codes"].reshape(60, N)
    assert torch.equal(labels[:, 2:], codes) and bool((labels[:, :2] == IGNORE_INDEX).all())  # every video slot
    task_of = {vocab.task_token(t): t for t in vocab.tasks}
    seen = set()
    for i in range(60):
        task, video = task_of[int(ids[i, 0])], ids[i, 2:]
        visible = weights[i, 2:] == 0.5
        assert torch.equal(video[visible], codes[i][visible])  # unmasked: the truth
        region = regions[task].reshape(N) if task in regions else torch.zeros(N, dtype=torch.bool)
        masked = ~visible
        expected = batch[f"cond.{task}"][i].reshape(N) if task in regions else None
        if expected is not None:
            assert torch.equal(video[masked & region], expected[masked & region])  # the condition tokens
        assert bool((video[masked & ~region] == vocab.mask_token).all())
        seen.add(task)
    assert seen == set(vocab.tasks)
    # a dropped condition leaves the mask token in every masked slot
    (dropped, _, w), _ = _interior(batch, vocab, tasks=["frame_prediction"], cond_dropout_prob=1.0,
                                   unmasked_weight=0.5)
    assert torch.equal(dropped[:, 2:] == vocab.mask_token, w[:, 2:] == 1.0)


def test_interior_training_batch_errors_and_no_host_sync():
    vocab = TokenVocabulary(16, num_classes=3)  # with the sketch task
    with pytest.raises(ValueError, match="no sketch condition"):
        _interior(_batch(), vocab, tasks=["sketch"])
    with pytest.raises(ValueError, match=r"condition_regions\['interpolation'\]"):
        make_training_batch(_batch(), vocab, MaskingConfig(tasks=["interpolation"]), conditioning="interior")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        make_training_batch(_batch(), vocab, MaskingConfig(), conditioning="suffix")
    interior = TokenVocabulary(16, num_classes=3, tasks=INTERIOR_TASKS)
    regions = latent_condition_regions(INTERIOR_TASKS, GRID, (8, 16, 16), causal=False)
    batch = {k: v.to("meta") for k, v in _batch().items()}
    out = make_training_batch(batch, interior, MaskingConfig(uncond_prob=0.2), conditioning="interior",
                              condition_regions=regions, generator=torch.Generator().manual_seed(0))
    assert all(t.device.type == "meta" and t.shape == (6, 2 + N) for t in out)


def test_uncond_prob_drops_condition_and_class_together():
    vocab = TokenVocabulary(16, num_classes=3)
    g = torch.Generator().manual_seed(0)
    b = 4000
    batch = {"codes": torch.randint(0, 16, (b, *GRID), generator=g), "label": torch.randint(0, 3, (b,), generator=g),
             "cond.frame_prediction": torch.randint(0, 16, (b, *GRID), generator=g)}
    layout = SequenceLayout(GRID)

    def drops(**options):
        ids = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], **options),
                                  generator=torch.Generator().manual_seed(1)).input_ids
        return (ids[:, layout.prefix] == vocab.pad_token).all(dim=1), ids[:, 1] == vocab.unconditional_token

    prefix, label = drops(cond_dropout_prob=0.0, uncond_prob=0.3)
    assert torch.equal(prefix, label)  # only ever together
    assert prefix.float().mean().item() == pytest.approx(0.3, abs=0.03)
    prefix, label = drops(cond_dropout_prob=0.2, uncond_prob=0.1)
    assert (prefix & label).float().mean().item() == pytest.approx(0.1 + 0.9 * 0.04, abs=0.02)
    assert prefix.float().mean().item() == pytest.approx(0.1 + 0.9 * 0.2, abs=0.03)
    # uncond_prob = 0 is today's batch, draw for draw (the pinned fixture holds it too)
    a = make_training_batch(batch, vocab, MaskingConfig(uncond_prob=0.0), generator=torch.Generator().manual_seed(2))
    c = make_training_batch(batch, vocab, MaskingConfig(), generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="uncond_prob"):
        MaskingConfig(uncond_prob=1.5)


# --- frame prediction given several frame counts (tokenize --cond-frames) ------------------------------------------


def test_condition_names_and_carried_counts():
    assert tasks.condition_name("frame_prediction") == "frame_prediction"
    assert tasks.condition_name("frame_prediction", 5) == "frame_prediction.5"
    with pytest.raises(ValueError, match="no condition of 3 given frames"):
        tasks.condition_name("interpolation", 3)
    keys = ["codes", "cond.frame_prediction.5", "cond.frame_prediction", "cond.frame_prediction.x", "cond.inpaint"]
    assert tasks.carried_cond_frames(keys, "frame_prediction") == (1, 5)
    assert tasks.carried_cond_frames(["cond.frame_prediction.2"], "frame_prediction") == (2,)
    assert tasks.carries(["cond.frame_prediction.2"], tasks.task("frame_prediction"))
    assert not tasks.carries(["cond.frame_prediction.2"], tasks.task("interpolation"))
    # Moving MNIST's geometry: 17 frames, causal, 4 frames per latent frame: 5 given frames = 2 latent frames
    regions = latent_condition_regions(["frame_prediction", "class"], (5, 2, 2), (17, 8, 8), causal=True,
                                       cond_frames=(1, 5))
    assert sorted(regions) == ["frame_prediction", "frame_prediction.5"]
    assert regions["frame_prediction"].flatten(1).all(1).tolist() == [True, False, False, False, False]
    assert regions["frame_prediction.5"].flatten(1).all(1).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("conditioning", ["prefix", "interior"])
def test_training_batch_draws_a_given_frame_count_per_frame_prediction_example(conditioning):
    """Shards with 1- and 5-frame conditions: each example takes one, by the generator's last uniform draw
    (``floor(2u)``), with its codes and (interior) its region; the same seed gives the same batch."""
    grid, b = (5, 2, 2), 64
    n = math.prod(grid)
    vocab = TokenVocabulary(16, tasks=("frame_prediction", "unconditional"))
    batch = {"codes": torch.zeros(b, *grid, dtype=torch.long),
             "cond.frame_prediction": torch.full((b, *grid), 3), "cond.frame_prediction.5": torch.full((b, *grid), 7)}
    regions = latent_condition_regions(vocab.tasks, grid, (17, 8, 8), causal=True, cond_frames=(1, 5))

    def make(seed):
        return make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0),
                                   mask_ratio=1.0, generator=torch.Generator().manual_seed(seed),
                                   conditioning=conditioning,
                                   condition_regions=regions if conditioning == "interior" else None)

    ids = make(0).input_ids
    assert all(torch.equal(x, y) for x, y in zip(make(0), make(0)))
    g = torch.Generator().manual_seed(0)  # the draws replayed: task scores, two drops, the mask, then the count
    torch.rand((b, 1), generator=g), torch.rand(b, generator=g), torch.rand(b, generator=g)
    torch.rand(b, n, generator=g)
    five = (torch.rand(b, generator=g) * 2).long() == 1  # (B,) the 5-frame condition drawn
    assert 10 < int(five.sum()) < b - 10  # both counts are trained
    if conditioning == "prefix":
        expected = torch.where(five[:, None], 7, 3).expand(b, n)
        assert torch.equal(ids[:, 2:2 + n], expected)
        return
    video = ids[:, 2:].reshape(b, *grid)  # every slot masked: the region shows the drawn count's codes
    assert bool((video[five][:, :2] == 7).all()) and bool((video[five][:, 2:] == vocab.mask_token).all())
    assert bool((video[~five][:, :1] == 3).all()) and bool((video[~five][:, 1:] == vocab.mask_token).all())
    with pytest.raises(ValueError, match=r"condition_regions\['frame_prediction.5'\]"):
        make_training_batch(batch, vocab, MaskingConfig(), conditioning="interior", condition_regions={
            "frame_prediction": regions["frame_prediction"]})


def test_full_mask_prob_masks_every_video_token_of_that_share():
    """``full_mask_prob`` of the examples have every video slot masked (interior: the region shows the condition,
    the rest the mask token), as at decoding's first step; the others draw as before; a fixed ratio is kept."""
    vocab = TokenVocabulary(16, num_classes=3, tasks=INTERIOR_TASKS)
    g = torch.Generator().manual_seed(0)
    b = 2000
    batch = {"codes": torch.randint(0, 16, (b, *GRID), generator=g), "label": torch.full((b,), -1),
             "cond.frame_prediction": torch.randint(0, 16, (b, *GRID), generator=g)}
    options = dict(tasks=["frame_prediction"], cond_dropout_prob=0.0, unmasked_weight=0.0)
    (ids, _, weights), regions = _interior(batch, vocab, torch.Generator().manual_seed(1), full_mask_prob=0.25,
                                           **options)
    full = (weights[:, 2:] == 1.0).all(dim=1)  # (B,) every video slot masked (scored)
    assert full.float().mean().item() == pytest.approx(0.25, abs=0.03)  # a cosine draw alone never masks all
    region = regions["frame_prediction"].reshape(N)
    video = ids[full, 2:]
    assert torch.equal(video[:, region], batch["cond.frame_prediction"].reshape(b, N)[full][:, region])
    assert bool((video[:, ~region] == vocab.mask_token).all())
    # the other examples are the batch without the option, draw for draw (the new draw comes last)
    (plain, _, plain_weights), _ = _interior(batch, vocab, torch.Generator().manual_seed(1), **options)
    assert torch.equal(ids[~full], plain[~full]) and torch.equal(weights[~full], plain_weights[~full])
    # a fixed ratio (held-out scoring at one ratio) is what it says
    fixed = make_training_batch(batch, vocab, MaskingConfig(full_mask_prob=1.0, **options), mask_ratio=0.5,
                                generator=torch.Generator().manual_seed(1), conditioning="interior",
                                condition_regions=regions)
    assert bool(((fixed.loss_mask[:, 2:] == 1.0).sum(dim=1) == N // 2).all())
    with pytest.raises(ValueError, match="full_mask_prob"):
        MaskingConfig(full_mask_prob=1.5)
