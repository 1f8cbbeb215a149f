"""Long videos: FreeNoise-style shared noise for sliding context windows (docs/ARCHITECTURE.md, "Long videos").

The transformer denoises one window of `context_length` frames at a time (each window is a whole video to the
motion module, so its temporal position encoding starts at 0). FreeNoise (Qiu et al. 2023) makes the windows agree
by giving every window the same noise frames, locally shuffled: after the first window, each block of
`context_length - overlap` new frames reuses the noise of the frames `context_length` earlier, in a random order.
"""
from __future__ import annotations

import torch


def freenoise(noise: torch.Tensor, context_length: int, overlap: int, generator: torch.Generator | None = None,
              dim: int = 0) -> torch.Tensor:
    """`noise` with the frames along `dim` after the first `context_length` rebuilt from earlier frames.

    Frame `p` of each block starting at `s` (s = context_length, context_length + stride, ...; stride =
    context_length - overlap) takes frame `s - context_length + perm[p - s]` of the result so far, `perm` a random
    permutation of the block (from `generator`, on the CPU). With frames <= context_length nothing changes.
    Returns a new tensor; `noise` is left as it is.
    """
    if context_length < 1 or not 0 <= overlap < context_length:
        raise ValueError(f"context windows: expected context_length >= 1 and 0 <= overlap < context_length, found "
                         f"context_length {context_length}, overlap {overlap}")
    out = noise.clone()
    frames = out.shape[dim]
    stride = context_length - overlap
    for start in range(context_length, frames, stride):
        count = min(stride, frames - start)
        source = torch.randperm(count, generator=generator) + (start - context_length)
        out.narrow(dim, start, count).copy_(out.index_select(dim, source.to(out.device)))
    return out
