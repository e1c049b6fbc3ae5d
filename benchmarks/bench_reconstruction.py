"""Reconstruction quality at an equal wall-clock training budget, on the same real clips, vs magvit2-pytorch.

Both tokenizers (matched parameter count, see peers.py) train for the same number of seconds on the same clips in
the same order (AdamW, bf16 autocast, MSE + each side's own quantizer loss; no GAN or perceptual loss on either
side), then reconstruct the held-out clips of the manifest; PSNR / SSIM come from ``magvit.metrics``.

    .venv-bench/bin/python benchmarks/bench_reconstruction.py [--budget 150] [--markdown ...]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_clips(manifest: Path, split: str, frames: int, size: int, clips_per_video: int, seed: int) -> torch.Tensor:
    from magvit.data import ClipDataset

    dataset = ClipDataset(manifest, split=split, num_frames=frames, image_size=size, clips_per_video=clips_per_video,
                          seed=seed)
    return torch.stack([dataset[i]["video"] for i in range(len(dataset))])  # (N, 3, T, H, W)


def train_for(side, clips: torch.Tensor, budget: float, batch_size: int, lr: float, bf16: bool, seed: int) -> dict:
    """Train ``side`` for ``budget`` seconds; batches drawn in a seeded order shared by both sides."""
    model = side.model.train()
    params = [p for name, p in model.named_parameters() if not name.startswith(peers.MAGVIT2_SKIP)]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    losses, steps = [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        index = torch.randint(0, clips.shape[0], (batch_size,), generator=order)
        video = clips[index]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = side.train_loss(video)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        steps += 1
    elapsed = time.perf_counter() - start
    tail = losses[-10:]
    return {"steps": steps, "seconds": elapsed, "final_loss": sum(tail) / len(tail)}


@torch.no_grad()
def evaluate(side, clips: torch.Tensor) -> dict:
    from magvit import metrics

    side.model.eval()
    psnr, ssim = [], []
    for i in range(clips.shape[0]):
        video = clips[i : i + 1]
        recon = side.reconstruct(video).float().clamp(-1, 1)
        psnr.append(float(metrics.video_psnr(recon, video)))
        ssim.append(float(metrics.video_ssim(recon, video)))
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim)}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--manifest", default=str(ROOT / "data/sample/manifest.jsonl"))
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per side (default: %(default)s)")
    p.add_argument("--size", default="17x64x64", help="TxHxW clips (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    manifest = Path(args.manifest)
    if not manifest.is_file():
        sys.exit(f"no manifest at {manifest}: build the sample data first (python -m data_prep.sample_data)")
    t, h, w = (int(x) for x in args.size.split("x"))
    budget = 5.0 if args.quick else args.budget
    train = load_clips(manifest, "train", t, h, clips_per_video=2, seed=args.seed)
    val = load_clips(manifest, "val", t, h, clips_per_video=1, seed=args.seed)
    if args.quick:
        train, val = train[:4], val[:2]
    table = common.Table(
        f"Reconstruction after {budget:.0f} s of training each ({args.size}, batch {args.batch_size}, "
        f"{'fp32' if args.fp32 else 'bf16 autocast'}, {train.shape[0]} training clips, {val.shape[0]} held-out clips)",
        ["tokenizer", "parameters", "steps in budget", "s / step", "train loss (last 10)", "held-out PSNR (dB)",
         "held-out SSIM"],
    )
    torch.manual_seed(args.seed)
    ours = peers.build_ours(t, h, args.base_channels)
    n_ours = peers.count_parameters(ours)
    torch.manual_seed(args.seed)
    theirs, _ = peers.build_magvit2(h, n_ours, args.base_channels)
    results = {}
    for side, n in ((peers.OursSide(ours), n_ours),
                    (peers.Magvit2Side(theirs), peers.count_parameters(theirs, peers.MAGVIT2_SKIP))):
        run = train_for(side, train, budget, args.batch_size, args.lr, not args.fp32, args.seed)
        quality = evaluate(side, val)
        results[side.name] = (run, quality)
        table.add(side.name, f"{n / 1e6:.2f} M", run["steps"], f"{run['seconds'] / max(run['steps'], 1):.2f}",
                  f"{run['final_loss']:.4f}", f"{quality['psnr']:.2f}", f"{quality['ssim']:.4f}")
    table.notes.append("The train losses are not comparable across sides (each adds its own quantizer loss); PSNR "
                       "and SSIM are. Load average at the end: " + common.load_average() + ".")
    common.emit([table], header, args.markdown)


if __name__ == "__main__":
    main()
