"""Training throughput (samples/s) of the motion-module step on a small random 3D model, on this machine.

One training step = hybrid IDDPM loss (train/diffusion.py) + backward + AdamW on `attn_temporal`, the motion mode's
trainable part; VAE/T5 are left out (frozen, cacheable). Baseline: fp32, no gradient checkpointing, same process.
Each variant is timed --rounds times, interleaved with the others, and its best round is reported (other load on
the machine only slows rounds down). On a busy CPU, fewer threads (--threads 1) avoid OpenMP oversubscription.

    python bench/bench_train.py [--size tiny|mid] [--steps 5] [--rounds 2] [--threads N] [--device cpu|cuda]
    python bench/bench_train.py --quick      # smoke test: tiny, 1 step, 1 round
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_model.config import MotionModuleConfig, TransformerConfig  # noqa: E402
from easyanimate_model.train.diffusion import GaussianDiffusion  # noqa: E402
from easyanimate_model.transformer import Transformer3DModel  # noqa: E402

SIZES = {  # (config, batch, frames, latent side)
    "tiny": (TransformerConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16, caption_channels=32,
                               cross_attention_dim=64, motion_module=MotionModuleConfig()), 2, 8, 16),
    "mid": (TransformerConfig(num_layers=4, num_attention_heads=8, attention_head_dim=32, caption_channels=256,
                              cross_attention_dim=256, motion_module=MotionModuleConfig()), 2, 8, 32),
}


VARIANTS = (  # (label, autocast dtype, gradient checkpointing); the first is the baseline
    ("fp32", None, False), ("fp32 + gradient checkpointing", None, True), ("bf16 autocast", torch.bfloat16, False),
    ("bf16 autocast + checkpointing", torch.bfloat16, True))


def measure(size, steps, device, dtype, checkpointing):
    config, batch, frames, side = SIZES[size]
    torch.manual_seed(0)
    model = Transformer3DModel(config, device=device).train()
    model.gradient_checkpointing = checkpointing
    params = [p for n, p in model.named_parameters() if "attn_temporal" in n]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=3e-2, eps=1e-10)
    diffusion = GaussianDiffusion()
    x0 = torch.randn(batch, 4, frames, side, side, device=device)
    text = torch.randn(batch, 120, config.caption_channels, device=device)
    mask = torch.ones(batch, 120, device=device)

    def step():
        t = diffusion.sample_timesteps(batch, device=device)
        noise = torch.randn_like(x0)
        xt = diffusion.q_sample(x0, t, noise)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(xt, t, text, mask)
        loss = diffusion.training_losses(out, x0, xt, t, noise)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return steps * batch / seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per variant; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: --size tiny --steps 1 --rounds 1")
    args = p.parse_args()
    if args.quick:
        args.size, args.steps, args.rounds = "tiny", 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config, batch, frames, side = SIZES[args.size]
    print(f"device {device}, size {args.size}: {config.num_layers} layers, hidden {config.inner_dim}, batch {batch}, "
          f"{frames} frames, latent {side}x{side}, {args.steps} steps x {args.rounds} rounds, "
          f"threads {torch.get_num_threads()}")
    best = {}
    for _ in range(args.rounds):
        for label, dtype, checkpointing in VARIANTS:
            rate, peak = measure(args.size, args.steps, device, dtype, checkpointing)
            if label not in best or rate > best[label][0]:
                best[label] = (rate, peak)
    base = best[VARIANTS[0][0]][0]
    for label, _, _ in VARIANTS:
        rate, peak = best[label]
        memory = f"  peak {peak:8.1f} MiB" if peak is not None else ""
        ratio = "(baseline)" if label == VARIANTS[0][0] else f"ratio vs fp32 {rate / base:5.2f}x"
        print(f"{label:29s}: {rate:8.3f} samples/s{memory}  {ratio}")


if __name__ == "__main__":
    main()
