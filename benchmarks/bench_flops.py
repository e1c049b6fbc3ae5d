"""Achieved FLOP/s of the tokenizer and transformer training steps as a fraction of this machine's measured bf16
matmul peak (measured in the same run, same threads, at the start and at the end).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward;
elementwise work is not counted, so the fraction is a lower bound on how busy the cores are). SDPA's fused CPU
kernel is counted like the math path (two attention matmuls forward, four backward; the fused backward's recompute
of the scores is not counted), so every transformer recipe does the same counted work.

The transformer step (MAGVIT-B at both sequence layouts, interior COMMIT ``2 + N`` and prefix ``2 + 2N``) is a whole
training step: masked batch, forward, masked-token loss, backward, AdamW. Its recipes are timed interleaved (a b c,
c b a, ...) so that load changes hit them alike:

- ``before``: attention dropout 0.1 (SDPA's math path), ``gelu_new``, bf16 autocast over fp32 weights, the
  per-parameter AdamW loop (the defaults until 2026-12-01);
- ``after, autocast``: today's TransformerConfig defaults (attention dropout 0, ``gelu_pytorch_tanh``), bf16
  autocast over fp32 weights (``precision: autocast-bf16``), fused AdamW (``magvit.optim.build_adam``);
- ``after, bf16 weights``: the same with bf16 weights and an fp32 master copy in the fused AdamW, as DeepSpeed's
  bf16 mode (``precision: bf16``, configs/transformer/B.yaml) trains.

The first call of each transformer step is profiled (which SDPA kernel ran, how many ``aten::bernoulli_`` and
``aten::_softmax`` calls it made), the second counted, the next ones timed: wall clock and the process's CPU time.

    .venv-bench/bin/python benchmarks/bench_flops.py [--threads 1] [--markdown benchmarks/results/flops.md]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """``Q K^T`` and ``P V`` of ``(B, heads, L, d)`` tensors."""
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[2] * (d + value_shape[3])


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return 2 * _attention_flops(query_shape, key_shape, value_shape)  # dP, dV, dQ, dK (as the math path)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> tuple[float, float]:
    """FLOP/s of an ``n x n @ n x n`` matmul in ``dtype``: (per wall-clock second, per CPU second), medians."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):  # warm-up
        torch.mm(a, b)
    times = time_interleaved([lambda: torch.mm(a, b)] * 2, min_reps=reps, max_seconds=0.0)
    return (2 * n**3 / statistics.median(w for w, _ in times[0] + times[1]),
            2 * n**3 / statistics.median(c for _, c in times[0] + times[1]))


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def profile_attention(step) -> str:
    """Which SDPA kernel one call of ``step`` ran, and its ``aten::bernoulli_`` (dropout masks) and
    ``aten::_softmax`` (the math path's softmax) calls, from the profiler."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    calls = {e.key: e.count for e in prof.key_averages()}
    fused = calls.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0)
    math = calls.get("aten::_scaled_dot_product_attention_math", 0)
    kernel = f"fused x{fused}" if fused and not math else f"math x{math}" if math else "none"
    return f"{kernel}; bernoulli_ x{calls.get('aten::bernoulli_', 0)}, _softmax x{calls.get('aten::_softmax', 0)}"


def tokenizer_step(frames: int, size: int, base_channels: int, batch: int):
    model = peers.build_ours(frames, size, base_channels).train()
    side = peers.OursSide(model)
    video = torch.rand(batch, 3, frames, size, size) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = side.train_loss(video)
        loss.backward()

    params = peers.count_parameters(model)
    return step, f"tokenizer ({params / 1e6:.1f} M params, LFQ 2^10), {frames}x{size}x{size}, batch {batch}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a transformer training step runs (see the module docstring)."""

    name: str
    model: dict  # TransformerConfig overrides
    bf16_weights: bool  # bf16 parameters + fp32 master copy in the optimizer (else fp32 parameters + autocast)
    fused_adam: bool


RECIPES = (
    Recipe("before", dict(attention_dropout=0.1, hidden_act="gelu_new"), bf16_weights=False, fused_adam=False),
    Recipe("after, autocast", {}, bf16_weights=False, fused_adam=True),
    Recipe("after, bf16 weights", {}, bf16_weights=True, fused_adam=True),
)
INTERIOR_TASKS = ("frame_prediction", "class", "unconditional")


def _optimizer_step(model: torch.nn.Module, recipe: Recipe):
    """AdamW (MAGVIT's betas and weight decay) over the model, or over an fp32 master copy of its bf16 weights
    (grads cast up, the update cast back down, as DeepSpeed's bf16 optimizer does)."""
    params = list(model.parameters())
    master = [p.detach().float().requires_grad_() for p in params] if recipe.bf16_weights else params
    opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045,
                            fused=True if recipe.fused_adam else None)

    def step():
        if recipe.bf16_weights:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
        opt.step()
        if recipe.bf16_weights:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
    return step


def transformer_step(preset: str, grid: tuple[int, int, int], batch: int, conditioning: str, recipe: Recipe):
    from magvit.conditions import latent_condition_regions
    from magvit.masking import MaskingConfig, make_training_batch, masked_token_loss
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    interior = conditioning == "interior"
    overrides = dict(recipe.model, tasks=INTERIOR_TASKS) if interior else recipe.model
    config = TransformerConfig.preset(preset, token_grid=grid, codebook_size=1024, conditioning=conditioning,
                                      **overrides)
    torch.manual_seed(0)
    model = MaskedVideoTransformer(config).train()
    if recipe.bf16_weights:
        model = model.to(torch.bfloat16)
    optimizer_step = _optimizer_step(model, recipe)
    codes = torch.randint(0, config.codebook_size, (batch, *grid))
    regions = (latent_condition_regions(INTERIOR_TASKS, grid, (4 * grid[0], 8 * grid[1], 8 * grid[2]), False)
               if interior else None)
    generator = torch.Generator().manual_seed(0)
    masking = MaskingConfig(tasks=["frame_prediction"])

    def step():
        model.zero_grad(set_to_none=True)
        tb = make_training_batch({"codes": codes, "cond.frame_prediction": codes}, config.vocab, masking,
                                 generator=generator, conditioning=conditioning, condition_regions=regions)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not recipe.bf16_weights):
            logits = model(tb.input_ids)
        loss = masked_token_loss(logits, tb.labels, tb.loss_mask, config.codebook_size, masking.label_smoothing)
        loss.backward()
        optimizer_step()

    params = sum(p.numel() for p in model.parameters())
    label = (f"B ({params / 1e6:.0f} M), {conditioning} (sequence {config.max_length}), batch {batch}"
             if preset == "B" else f"{preset}, {conditioning} (sequence {config.max_length}), batch {batch}")
    return step, label


def time_interleaved(steps, min_reps: int, max_seconds: float) -> list[list[tuple[float, float]]]:
    """(wall, CPU) seconds of each step's calls, in rounds whose order alternates (a b c, c b a, ...)."""
    times: list[list[tuple[float, float]]] = [[] for _ in steps]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < max_seconds and rounds < 20):
        order = range(len(steps)) if rounds % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[i]()
            times[i].append((time.perf_counter() - wall, time.process_time() - cpu))
        rounds += 1
    return times


def transformer_rows(preset: str, grid: tuple[int, int, int], batch: int, args) -> list[tuple]:
    """(label, recipe, attention kernels, FLOPs, wall s, CPU s) of every recipe at both layouts."""
    rows = []
    for conditioning in ("interior", "prefix"):
        built = [transformer_step(preset, grid, batch, conditioning, r) for r in RECIPES]
        attention = [profile_attention(step) for step, _ in built]  # also the warm-up calls
        counted = [count_flops(step) for step, _ in built]
        times = time_interleaved([step for step, _ in built], min_reps=2 if args.quick else 3,
                                 max_seconds=args.max_seconds)
        for recipe, (_, label), kernels, flops, t in zip(RECIPES, built, attention, counted, times):
            rows.append((label, recipe.name, kernels, flops, statistics.median(w for w, _ in t),
                         statistics.median(c for _, c in t)))
            print("  " + " | ".join(str(x) for x in rows[-1]), file=sys.stderr, flush=True)
        del built
    return rows


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--max-seconds", type=float, default=20.0, help="timed seconds per step (at least 2 reps)")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="run on a CPU without native bf16 too (bf16 is then emulated: ~47x slower, not a peak)")
    args = p.parse_args()
    if not (args.emulated_bf16 or common.native_bf16()):
        print(f"bench_flops measures bf16 training against the bf16 peak; {common.cpu_name()} has no native bf16 "
              "(AMX / AVX512-BF16) and would emulate it: nothing to measure (--emulated-bf16 runs it anyway)")
        return
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    n, reps = (512, 5) if args.quick else (2048, 20)
    peak_start = matmul_peak(torch.bfloat16, n, reps)
    peak_fp32 = matmul_peak(torch.float32, n, reps // 4)
    tokenizer_steps = ([tokenizer_step(9, 32, 16, 1)] if args.quick else
                       [tokenizer_step(17, 64, 32, 1), tokenizer_step(16, 128, 32, 1)])
    timed = []
    for step, label in tokenizer_steps:
        flops = count_flops(step)  # also the warm-up call
        timed.append((label, flops, common.time_call(step, warmup=0, min_reps=2, max_seconds=args.max_seconds)))
    rows = (transformer_rows("tiny", (2, 4, 4), 2, args) if args.quick else
            transformer_rows("B", (4, 16, 16), 1, args))
    peak_end = matmul_peak(torch.bfloat16, n, reps)
    peak, peak_cpu = max(peak_start[0], peak_end[0]), max(peak_start[1], peak_end[1])
    tokenizers = common.Table(
        "Achieved FLOP/s of tokenizer training steps (bf16 autocast, forward + backward)",
        ["training step", "GFLOP / step", "seconds / step", "achieved GFLOP/s", "fraction of bf16 matmul peak"])
    for label, flops, timing in timed:
        tokenizers.add(label, f"{flops / 1e9:.0f}", f"{timing.median:.2f}", f"{flops / timing.median / 1e9:.0f}",
                       f"{flops / timing.median / peak:.1%}")
    transformers = common.Table(
        "Transformer training step (forward + backward + AdamW), recipes interleaved",
        ["layout", "recipe", "attention (profiler)", "GFLOP / step", "s / step (wall)", "CPU s / step",
         "achieved GFLOP/s", "fraction of bf16 peak", "fraction (CPU time)"])
    for label, recipe, kernels, flops, wall, cpu in rows:
        transformers.add(label, recipe, kernels, f"{flops / 1e9:.0f}", f"{wall:.2f}", f"{cpu:.2f}",
                         f"{flops / wall / 1e9:.0f}", f"{flops / wall / peak:.1%}", f"{flops / cpu / peak_cpu:.1%}")
    transformers.notes += [
        f"Measured bf16 peak ({n}x{n} matmul, {args.threads} thread(s), median of {2 * reps}): "
        f"{peak_start[0] / 1e9:.0f} GFLOP/s at the start, {peak_end[0] / 1e9:.0f} at the end (per CPU second: "
        f"{peak_start[1] / 1e9:.0f}, {peak_end[1] / 1e9:.0f}); both tables use the higher (fp32: "
        f"{peak_fp32[0] / 1e9:.0f} GFLOP/s).",
        "Fractions use wall-clock seconds; \"fraction (CPU time)\" uses the process's CPU seconds against the peak "
        "per CPU second (what the step costs the cores when other work shares them).",
        f"Load average at the end: {common.load_average()}."]
    common.emit([tokenizers, transformers], header, args.markdown)


if __name__ == "__main__":
    main()
