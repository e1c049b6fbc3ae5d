"""torch.compile for the training steps on CPU: eager against compiled, compile time counted.

For each network (the Moving MNIST and demo tokenizers, the Moving MNIST masked transformer; model sections of
``configs/*/*.yaml``) one eager copy and one ``torch.compile``d copy (same initial weights, same batches) take
training steps (forward, loss, backward, Adam) interleaved: a round runs one step of each, in alternating order. The
compiled side's first step(s) include the compilation; reported: the eager and compiled step time (median after
the warm-up), the compile overhead (first steps minus steady steps), the speed-up, and the number of steps after
which compiling pays (overhead / time saved per step) against the number of steps a demo / config run takes.

    .venv/bin/python benchmarks/bench_compile.py --threads 1 --steps 12 --markdown benchmarks/results/compile.md
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tokenizer_case(config: str, batch: int):
    """(model, loss(model, step), label) of a tokenizer config's model: MSE + the quantizer loss (no GAN)."""
    from magvit.run_config import TokenizerTrainConfig
    from magvit.tokenizer import VideoTokenizer

    cfg = TokenizerTrainConfig.load(str(ROOT / config))
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model).train()
    t, s = cfg.model.num_frames, cfg.model.image_size
    videos = [torch.rand(batch, 3, t, s, s) * 2 - 1 for _ in range(4)]

    def loss(net, step: int) -> torch.Tensor:
        video = videos[step % len(videos)]
        recon, stats = net(video)
        return F.mse_loss(recon.float(), video) + stats["quantizer_loss"]

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, loss, f"tokenizer {Path(config).stem} ({params:.1f} M), {t}x{s}x{s}, batch {batch}"


def transformer_case(config: str, batch: int):
    """The masked transformer of a config on random codes, with its own masking (interior frame prediction)."""
    from magvit.conditions import latent_condition_region
    from magvit.masking import make_training_batch, masked_token_loss
    from magvit.run_config import TransformerTrainConfig
    from magvit.transformer import MaskedVideoTransformer

    cfg = TransformerTrainConfig.load(str(ROOT / config))
    grid = (5, 8, 8)  # the Moving MNIST tokenizer's grid
    config_ = cfg.model.replace(codebook_size=1024, token_grid=grid)
    torch.manual_seed(0)
    model = MaskedVideoTransformer(config_).train()
    codes = torch.randint(0, 1024, (batch, *grid))
    # 5 given frames of 17 (causal): latent frames 0-1, as the Moving MNIST benchmark conditions
    regions = ({"frame_prediction": latent_condition_region("frame_prediction", grid, (17, 64, 64), True,
                                                             num_cond_frames=5)}
               if config_.conditioning == "interior" else None)
    masking = cfg.masking.replace(tasks=["frame_prediction"])  # the config's masking, on the one task

    def loss(net, step: int) -> torch.Tensor:
        tb = make_training_batch({"codes": codes, "cond.frame_prediction": codes}, config_.vocab, masking,
                                 conditioning=config_.conditioning, generator=torch.Generator().manual_seed(step),
                                 condition_regions=regions)
        return masked_token_loss(net(tb.input_ids), tb.labels, tb.loss_mask, config_.codebook_size,
                                 masking.label_smoothing)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, loss, f"transformer {Path(config).stem} ({params:.1f} M), grid {grid}, batch {batch}"


def timed_step(model, loss_fn, optimizer, step: int) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, step)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def compare(model, loss_fn, steps: int, warmup: int) -> dict:
    """Eager and compiled copies stepped interleaved; seconds per step of each (lists)."""
    eager, compiled = model, torch.compile(copy.deepcopy(model))
    opts = [torch.optim.Adam(m.parameters(), 1e-4) for m in (eager, compiled)]
    times: list[list[float]] = [[], []]
    for step in range(steps):
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(timed_step((eager, compiled)[i], loss_fn, opts[i], step))
        print(f"  step {step}: eager {times[0][-1]:.3f} s, compiled {times[1][-1]:.3f} s", file=sys.stderr,
              flush=True)
    eager_s = statistics.median(times[0][warmup:])
    compiled_s = statistics.median(times[1][warmup:])
    overhead = sum(times[1][:warmup]) - warmup * compiled_s
    return {"eager": eager_s, "compiled": compiled_s, "overhead": overhead, "first": times[1][0]}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--steps", type=int, default=12, help="steps per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="compiled steps counted as compilation (default: 2)")
    p.add_argument("--cases", default="mnist-tokenizer,mnist-transformer,demo-tokenizer",
                   help="which training steps (default: %(default)s)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    steps = 4 if args.quick else args.steps
    # (case, the steps a run of it takes: the demo's / the config's)
    known = {"mnist-tokenizer": (lambda: tokenizer_case("configs/tokenizer/mnist.yaml", 4), "60 (demo) / 2000 (config)"),
             "mnist-transformer": (lambda: transformer_case("configs/transformer/mnist.yaml", 8),
                                   "150 (demo) / 3000 (config)"),
             "demo-tokenizer": (lambda: tokenizer_case("configs/tokenizer/demo.yaml", 2), "400 (demo)")}
    names = ["mnist-tokenizer", "mnist-transformer"] if args.quick else args.cases.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    cases = [known[n] for n in names]
    table = common.Table(
        "torch.compile of training steps on the CPU (eager vs compiled, interleaved)",
        ["training step", "eager s/step", "compiled s/step", "speed-up", "compile overhead s", "pays after (steps)",
         "steps of a run"])
    for build, run_steps in cases:
        model, loss_fn, label = build()
        print(label, file=sys.stderr, flush=True)
        try:
            r = compare(model, loss_fn, steps, min(args.warmup, steps - 1))
        except Exception as err:  # a compiler failure is a result too
            table.add(label, "-", "-", "-", "-", f"compile failed: {type(err).__name__}: {str(err)[:80]}", run_steps)
            continue
        saved = r["eager"] - r["compiled"]
        pays = f"{r['overhead'] / saved:.0f}" if saved > 0 else "never"
        table.add(label, f"{r['eager']:.3f}", f"{r['compiled']:.3f}", f"{r['eager'] / r['compiled']:.2f}x",
                  f"{r['overhead']:.1f}", pays, run_steps)
    table.notes += [f"torch {torch.__version__}, inductor (default mode); {steps} steps per side, medians after the "
                    f"first {args.warmup} (the compiled side's compilation); fp32; Adam; random inputs.",
                    f"Load average at the end: {common.load_average()}."]
    common.emit([table], header, args.markdown)


if __name__ == "__main__":
    main()
