"""Prompt travel: a schedule of keyframed prompts across the frames of a video (docs/ARCHITECTURE.md, "Prompt
schedules").

A schedule is text of `frame: prompt` lines, e.g.

    0: spring, pink cherry blossoms
    80: summer, green leaves
    160: autumn, yellow leaves

Frame f takes the prompt of the keyframes around it: with "linear" interpolation the T5 embeddings (and padding masks)
are blended between the previous and the next keyframe, with "hold" the previous keyframe's prompt is kept until the
next one. Frames before the first keyframe hold the first prompt, frames after the last hold the last.

Memory: `PromptSchedule` stores each distinct prompt's embedding ONCE ([K, L, C], K = distinct prompts) and the
keyframe table (K small ints); the state of a frame (two prompt indices and a blend weight) is computed from the
keyframes on demand, and `frame_contexts` materialises only the distinct states of the frames asked for (one window
or chunk), so repeated prompts never multiply memory by the frame count.

Blending two prompts A, B with weight w (0 at A's keyframe, 1 at B's) is a plain lerp of the T5 embeddings AND of
the padding masks: e = (1 - w) e_A + w e_B, m = (1 - w) m_A + w m_B. A token position used by only one prompt thus
fades in/out with attention weight m (the transformer turns a mask into the additive bias log(m), clamped at -10000,
which is exactly the original's (1 - m) * -10000 for 0/1 masks), and both tensors change continuously along the video.
At w = 0 and w = 1 the keyframe's own tensors are used unchanged.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

INTERPOLATIONS = ("linear", "hold")

# `12: text`, `"12": "text",` (the AnimateDiff / FizzNodes JSON-ish style pasted line by line)
_LINE = re.compile(r'^\s*"?\s*([+-]?\d+)\s*"?\s*:(.*)$')
_NUMBER_LIKE = re.compile(r'^\s*"?\s*[+-]?[\d.]+\s*"?\s*:')


class ScheduleError(ValueError):
    """A bad prompt schedule; the message names the input and the line."""


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str
    line: int  # 1-based line in the schedule text


def looks_like_schedule(text: str) -> bool:
    """True when the first non-blank, non-comment line starts with a frame number and a colon (`0: ...`)."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped not in ("{", "}"):
            return bool(_NUMBER_LIKE.match(stripped))
    return False


def _unquote(prompt: str) -> str:
    prompt = prompt.strip()
    if prompt.endswith(","):
        prompt = prompt[:-1].rstrip()
    if len(prompt) >= 2 and prompt[0] == prompt[-1] == '"':
        prompt = prompt[1:-1].strip()
    return prompt


def parse_schedule(text: str, num_frames: int | None = None, name: str = "schedule") -> list[Keyframe]:
    """Keyframes of a `frame: prompt` schedule, checked: integer frames, ascending, no duplicates, none negative,
    none at or past `num_frames` (when given), no empty prompt. Blank lines, `#` comments and lone `{`/`}` lines
    are skipped. Raises ScheduleError naming `name` and the 1-based line."""
    keyframes: list[Keyframe] = []
    seen: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped in ("{", "}"):
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise ScheduleError(f"{name} line {number}: expected 'frame: prompt' with an integer frame, found "
                                f"{stripped[:60]!r}")
        frame, prompt = int(match.group(1)), _unquote(match.group(2))
        if frame < 0:
            raise ScheduleError(f"{name} line {number}: frame {frame} is negative (frames start at 0)")
        if frame in seen:
            raise ScheduleError(f"{name} line {number}: duplicate frame {frame} (already on line {seen[frame]})")
        if keyframes and frame < keyframes[-1].frame:
            raise ScheduleError(f"{name} line {number}: frame {frame} comes after frame {keyframes[-1].frame} "
                                f"(line {keyframes[-1].line}); keyframes must be in ascending order")
        if num_frames is not None and frame >= num_frames:
            raise ScheduleError(f"{name} line {number}: frame {frame} is past the video ({num_frames} frames: "
                                f"0..{num_frames - 1})")
        if not prompt:
            raise ScheduleError(f"{name} line {number}: empty prompt for frame {frame}")
        seen[frame] = number
        keyframes.append(Keyframe(frame, prompt, number))
    if not keyframes:
        raise ScheduleError(f"{name}: no keyframes; expected lines like '0: a forest in spring'")
    return keyframes


def check_frames(schedule: "PromptSchedule", num_frames: int, name: str = "schedule"):
    """ScheduleError when a keyframe of `schedule` lies at or past the video's `num_frames` (the latent's frame
    count; parse_schedule checks the text against the node's `frames`)."""
    lines = schedule.key_lines or [None] * len(schedule.key_frames)
    for frame, line in zip(schedule.key_frames, lines):
        if frame >= num_frames:
            where = f" line {line}" if line else ""
            raise ScheduleError(f"{name}{where}: keyframe {frame} is past the video ({num_frames} frames: "
                                f"0..{num_frames - 1})")


@dataclass
class FrameContexts:
    """Per-row text contexts without copies: row r of a frames-in-batch batch uses `embeds[index[r]]` and
    `mask[index[r]]` (embeds [U, L, C], mask [U, L] or None, index [rows] long)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    index: torch.Tensor

    def uniform_per_video(self, frames: int) -> bool:
        """True when all frames of every video share one context (then the per-video path is exact)."""
        index = self.index.view(-1, frames)
        return bool((index == index[:, :1]).all())

    def per_video(self, frames: int):
        """(embeds [B, L, C], mask [B, L] or None) for a uniform_per_video table."""
        first = self.index.view(-1, frames)[:, 0]
        return self.embeds[first], None if self.mask is None else self.mask[first]

    @staticmethod
    def cat(parts: Sequence["FrameContexts"]) -> "FrameContexts":
        """One table for row blocks stacked in order (e.g. the cond and uncond chunks of a CFG batch)."""
        if len(parts) == 1:
            return parts[0]
        embeds, masks, indexes, offset = [], [], [], 0
        any_mask = any(p.mask is not None for p in parts)
        for p in parts:
            embeds.append(p.embeds)
            if any_mask:
                masks.append(p.mask if p.mask is not None else torch.ones(p.embeds.shape[:2], dtype=p.embeds.dtype,
                                                                          device=p.embeds.device))
            indexes.append(p.index + offset)
            offset += p.embeds.shape[0]
        length = max(e.shape[1] for e in embeds)
        if any(e.shape[1] != length for e in embeds):  # pad shorter prompts with masked-out zero tokens
            if not any_mask:
                masks = [torch.ones(e.shape[:2], dtype=e.dtype, device=e.device) for e in embeds]
            pads = [length - e.shape[1] for e in embeds]
            embeds = [torch.nn.functional.pad(e, (0, 0, 0, p)) for e, p in zip(embeds, pads)]
            masks = [torch.nn.functional.pad(m, (0, p)) for m, p in zip(masks, pads)]
        return FrameContexts(torch.cat(embeds), torch.cat(masks) if masks else None, torch.cat(indexes))


class PromptSchedule:
    """Keyframed prompts: distinct prompt embeddings [K, L, C] (+ masks [K, L]) and keyframes (frame, prompt index).

    `num_frames` is the video length the schedule was written for (checks and memory estimates); frames past the
    last keyframe hold the last prompt whatever the video length.
    """

    def __init__(self, embeds: torch.Tensor, masks: torch.Tensor | None, key_frames: Sequence[int],
                 key_prompts: Sequence[int], num_frames: int, interpolation: str = "linear",
                 prompts: Sequence[str] | None = None, key_lines: Sequence[int] | None = None):
        if interpolation not in INTERPOLATIONS:
            raise ScheduleError(f"interpolation must be one of {INTERPOLATIONS}, found {interpolation!r}")
        if embeds.ndim != 3:
            raise ScheduleError(f"prompt embeddings must be [prompts, tokens, channels], found {tuple(embeds.shape)}")
        if masks is not None and tuple(masks.shape) != tuple(embeds.shape[:2]):
            raise ScheduleError(f"prompt masks must be {tuple(embeds.shape[:2])}, found {tuple(masks.shape)}")
        if not key_frames or len(key_frames) != len(key_prompts):
            raise ScheduleError("a schedule needs at least one keyframe and one prompt index per keyframe")
        if list(key_frames) != sorted(set(key_frames)) or key_frames[0] < 0:
            raise ScheduleError(f"keyframes must be distinct, ascending and >= 0, found {list(key_frames)}")
        if min(key_prompts) < 0 or max(key_prompts) >= embeds.shape[0]:
            raise ScheduleError(f"prompt indices must be in 0..{embeds.shape[0] - 1}, found {list(key_prompts)}")
        self.embeds, self.masks = embeds, masks
        self.key_frames, self.key_prompts = list(key_frames), list(key_prompts)
        self.num_frames, self.interpolation = int(num_frames), interpolation
        self.prompts = list(prompts) if prompts is not None else None
        self.key_lines = list(key_lines) if key_lines is not None else None

    @classmethod
    def from_keyframes(cls, keyframes: Sequence[Keyframe], encode: Callable[[str], tuple], num_frames: int,
                       interpolation: str = "linear", key: Callable[[str], object] = None) -> "PromptSchedule":
        """Encode each distinct prompt once: `encode(prompt) -> (embeds [1, L, C], mask [1, L] or None)`;
        `key(prompt)` decides which prompts are the same (default: the text itself)."""
        key = key or (lambda p: p)
        index: dict = {}
        embeds, masks, prompts, key_prompts = [], [], [], []
        for kf in keyframes:
            k = key(kf.prompt)
            if k not in index:
                e, m = encode(kf.prompt)
                index[k] = len(embeds)
                embeds.append(e.reshape(-1, *e.shape[-2:])[:1])
                masks.append(None if m is None else m.reshape(-1, e.shape[-2])[:1])
                prompts.append(kf.prompt)
            key_prompts.append(index[k])
        if any(m is None for m in masks) and not all(m is None for m in masks):
            masks = [torch.ones(e.shape[:2], dtype=e.dtype, device=e.device) if m is None else m
                     for e, m in zip(embeds, masks)]
        return cls(torch.cat(embeds), None if masks[0] is None else torch.cat(masks),
                   [k.frame for k in keyframes], key_prompts, num_frames, interpolation, prompts,
                   [k.line for k in keyframes])

    # -- frame states --------------------------------------------------------------------------------------------
    def states(self, frames) -> list[tuple[int, int, float]]:
        """(prompt a, prompt b, weight of b) per frame, normalised so equal states compare equal."""
        out = []
        keys, prompts = self.key_frames, self.key_prompts
        for f in (int(f) for f in frames):
            # the last keyframe at or before f (the first one for frames before it)
            i = max(0, bisect.bisect_right(keys, f) - 1)
            a = prompts[i]
            if self.interpolation == "hold" or f <= keys[i] or i + 1 == len(keys):
                out.append((a, a, 0.0))
                continue
            b = prompts[i + 1]
            w = (f - keys[i]) / (keys[i + 1] - keys[i])
            out.append((a, a, 0.0) if a == b else (a, b, w))
        return out

    def is_uniform(self, frames=None) -> bool:
        """True when every frame (of `frames`, default all `num_frames`) has the same prompt state."""
        frames = range(self.num_frames) if frames is None else frames
        return len(set(self.states(frames))) <= 1

    def _blend(self, a: int, b: int, w: float, dtype, device):
        if w == 0.0:
            e, m = self.embeds[a], None if self.masks is None else self.masks[a]
            return e.to(device=device, dtype=dtype), None if m is None else m.to(device=device, dtype=dtype)
        ea, eb = self.embeds[a].to(device, torch.float32), self.embeds[b].to(device, torch.float32)
        e = torch.lerp(ea, eb, w).to(dtype)
        if self.masks is None:
            return e, None
        ma, mb = self.masks[a].to(device, torch.float32), self.masks[b].to(device, torch.float32)
        return e, torch.lerp(ma, mb, w).to(dtype)

    def frame_contexts(self, frames, dtype=None, device=None) -> FrameContexts:
        """Contexts of `frames` (absolute frame numbers, any order/repeats): only distinct states are built."""
        dtype = dtype or self.embeds.dtype
        device = device if device is not None else self.embeds.device
        states = self.states(frames)
        order: dict = {}
        for s in states:
            order.setdefault(s, len(order))
        built = [self._blend(a, b, w, dtype, device) for a, b, w in order]
        embeds = torch.stack([e for e, _ in built])
        mask = None if built[0][1] is None else torch.stack([m for _, m in built])
        index = torch.tensor([order[s] for s in states], dtype=torch.long, device=device)
        return FrameContexts(embeds, mask, index)

    def frame_embeddings(self, frames=None, dtype=None):
        """Materialised (embeds [n, L, C], mask [n, L] or None) for `frames` (default all): for tests/inspection."""
        frames = range(self.num_frames) if frames is None else frames
        ctx = self.frame_contexts(frames, dtype=dtype)
        return ctx.embeds[ctx.index], None if ctx.mask is None else ctx.mask[ctx.index]

    # -- memory --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the schedule (embeddings + masks; the keyframe table is a few Python ints)."""
        return self.embeds.nbytes + (0 if self.masks is None else self.masks.nbytes)

    def memory_estimate(self, num_frames: int | None = None, window: int | None = None) -> dict:
        frames = self.num_frames if num_frames is None else num_frames
        tokens, channels = self.embeds.shape[1:]
        distinct_per_window = max(len(set(self.states(range(s, min(frames, s + (window or frames))))))
                                  for s in range(0, frames, max(1, (window or frames) // 2)))
        return estimate_memory(frames, self.embeds.shape[0], tokens, channels, self.embeds.element_size(),
                               self.masks is not None, distinct_per_window)


def estimate_memory(num_frames: int, distinct_prompts: int, tokens: int, channels: int, element_size: int,
                    masks: bool = True, distinct_states_per_call: int | None = None) -> dict:
    """Bytes of a schedule's conditioning. `stored`: what the CONDITIONING holds (one embedding per distinct prompt);
    `per_call`: what one model call materialises (one context per distinct frame state in the window/chunk, at most
    the window's frame count; None = every frame distinct); `per_frame_copies`: what one tensor per frame would cost
    (the naive layout this design avoids)."""
    one = tokens * channels * element_size + (tokens * element_size if masks else 0)
    per_call = num_frames if distinct_states_per_call is None else distinct_states_per_call
    return {"stored": distinct_prompts * one, "per_call": per_call * one, "per_frame_copies": num_frames * one}


def batch_contexts(schedules: Sequence[PromptSchedule], rows: int, frames: int, positions=None,
                   total_frames: int | None = None, dtype=None, device=None) -> FrameContexts:
    """Per-row contexts of one frames-in-batch model call.

    rows = len(schedules) chunks (e.g. cond and uncond) x videos x `frames`; chunk c follows schedules[c]. Row r of a
    chunk is frame r % frames, or, for a context window, positions[r] (the window's indices into the whole latent,
    taken modulo `total_frames`, the frames per video of the whole latent).
    """
    chunks = len(schedules)
    if chunks == 0 or rows % chunks or (rows // chunks) % frames:
        raise ValueError(f"a batch of {rows} rows is not {chunks} chunk(s) of whole {frames}-frame videos")
    per_chunk = rows // chunks
    if positions is None:
        frame_of_row = [r % frames for r in range(per_chunk)]
    else:
        positions = [int(p) for p in positions]
        if len(positions) != per_chunk:
            raise ValueError(f"the context window has {len(positions)} indices for {per_chunk} rows per chunk")
        frame_of_row = [p % total_frames if total_frames else p for p in positions]
    return FrameContexts.cat([s.frame_contexts(frame_of_row, dtype=dtype, device=device) for s in schedules])
