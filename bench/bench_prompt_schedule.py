"""Prompt-schedule conditioning memory and per-frame embeddings, printed as ratios (no timing).

1. Memory of a 240-frame schedule with three prompts at the real T5-XXL size (120 tokens x 4096, fp32): the bytes
   the CONDITIONING holds, the bytes one model call materialises (80-frame windows), against one tensor per frame.
   Measured on real tensors (the built schedule and the contexts of every window), next to the estimate.
2. Per-frame embeddings of the three-season schedule with the tiny T5 (easyanimate_model.tiny): the distance of
   frames along the video to each keyframe prompt's embedding, relative to the distance between the prompts.

    python bench/bench_prompt_schedule.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from easyanimate_model.prompt_schedule import PromptSchedule, parse_schedule  # noqa: E402

FRAMES, WINDOW, OVERLAP = 240, 80, 20
SCHEDULE = "0: spring, pink blossoms\n120: summer, green trees\n239: autumn, yellow leaves"


def mib(n):
    return f"{n / 2**20:8.1f} MiB"


def memory():
    print(f"1. conditioning memory: {FRAMES} frames, 3 prompts, T5-XXL 120 x 4096 fp32, windows {WINDOW}/{OVERLAP}")
    g = torch.Generator().manual_seed(0)
    embeds, masks = torch.randn(3, 120, 4096, generator=g), torch.ones(3, 120)
    windows = [list(range(s, min(FRAMES, s + WINDOW))) for s in range(0, FRAMES - OVERLAP, WINDOW - OVERLAP)]
    print(f"   {'interpolation':<14}{'stored':>14}{'per window (max)':>20}{'one per frame':>16}{'ratio':>8}")
    for interpolation in ("hold", "linear"):
        s = PromptSchedule(embeds, masks, [0, 120, 239], [0, 1, 2], FRAMES, interpolation)
        est = s.memory_estimate(window=WINDOW)
        measured = max(c.embeds.nbytes + c.mask.nbytes for c in (s.frame_contexts(w) for w in windows))
        print(f"   {interpolation:<14}{mib(s.nbytes()):>14}{mib(measured):>20}{mib(est['per_frame_copies']):>16}"
              f"{est['per_frame_copies'] / s.nbytes():7.0f}x")
        assert s.nbytes() == est["stored"]


def embeddings():
    from easyanimate_model.text import encode_prompt, load_text_encoder
    from easyanimate_model.tiny import PIPELINE_NAME, write_release_files

    print("\n2. per-frame embeddings (tiny T5), schedule:\n   " + SCHEDULE.replace("\n", "\n   "))
    with tempfile.TemporaryDirectory() as tmp:
        write_release_files(tmp, vae="tiny")
        tokenizer, encoder = load_text_encoder(Path(tmp) / "diffusers" / PIPELINE_NAME)
        with torch.no_grad():
            def encode(prompt):
                return encode_prompt(tokenizer, encoder, [prompt])

            keyframes = parse_schedule(SCHEDULE, FRAMES)
            s = PromptSchedule.from_keyframes(keyframes, encode, FRAMES, "linear")
    e, _ = s.frame_embeddings()
    keys = [e[k.frame] for k in keyframes]
    scale = (keys[0] - keys[2]).norm()
    print(f"   distance / |spring - autumn| ({scale:.3f}):")
    print(f"   {'frame':>6}{'spring':>9}{'summer':>9}{'autumn':>9}{'step to next':>14}")
    for f in (0, 1, 60, 119, 120, 180, 238, 239):
        d = [((e[f] - k).norm() / scale).item() for k in keys]
        step = ((e[min(f + 1, FRAMES - 1)] - e[f]).norm() / scale).item()
        print(f"   {f:>6}" + "".join(f"{x:9.3f}" for x in d) + f"{step:14.4f}")


if __name__ == "__main__":
    memory()
    embeddings()
