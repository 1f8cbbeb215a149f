"""EasyAnimate Prompt Schedule: keyframed prompts across the frames of a video (prompt travel).

The library (easyanimate_model.prompt_schedule) parses and checks the schedule and holds the per-frame states; this
node encodes each distinct prompt once with the original tokenization (nodes_text.encode) and returns CONDITIONING
whose entry carries the PromptSchedule under keys.SCHEDULE_KEY. The tensor part is the first keyframe's
prompt, so a consumer that ignores schedules still gets a sensible single-prompt conditioning.
"""
from __future__ import annotations

import logging

from ..easyanimate_model.prompt_schedule import (INTERPOLATIONS, PromptSchedule, ScheduleError,
                                                 looks_like_schedule, parse_schedule)
from ..easyanimate_model.text import DEFAULT_NEGATIVE_PROMPT, MAX_LENGTH, preprocess_prompt
from .keys import SCHEDULE_KEY
from .nodes_text import encode

log = logging.getLogger("EasyAnimate")
NODE = "EasyAnimatePromptSchedule"

DEFAULT_SCHEDULE = (
    "0: a country road through a forest in spring, pink cherry blossoms, fresh green grass, soft morning light\n"
    "40: the same country road through a forest in summer, lush green trees, bright sunshine, blue sky\n"
    "79: the same country road through a forest in autumn, yellow and red leaves falling, golden evening light"
)


def schedule_conditioning(clip, text: str, frames: int, interpolation: str, name: str):
    """CONDITIONING [[first keyframe embeds [1, L, C], {attention_mask, SCHEDULE_KEY: PromptSchedule, ...}]]."""
    keyframes = parse_schedule(text, frames, name=name)
    extras = {}

    def encode_one(prompt):
        cond = encode(clip, prompt)[0]
        extras.setdefault("first", cond)
        return cond[0], cond[1].get("attention_mask")

    schedule = PromptSchedule.from_keyframes(keyframes, encode_one, frames, interpolation, key=preprocess_prompt)
    embeds, first_extras = extras["first"]
    return [[embeds, {**first_extras, SCHEDULE_KEY: schedule}]]


class EasyAnimatePromptSchedule:
    DESCRIPTION = ("Prompt travel: keyframed prompts across the video, one 'frame: prompt' line per keyframe "
                   "(frames ascending, counted from 0). Each frame's tokens attend to that frame's prompt; between "
                   "keyframes the T5 embeddings blend linearly (or hold). Encoded like EasyAnimate Text Encode "
                   f"(lower-cased, {MAX_LENGTH} tokens with mask); each distinct prompt is encoded and stored once.")
    CATEGORY = "EasyAnimate/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Conditioning with the prompt schedule (works with EasyAnimate Video Sampler, KSampler, "
                       "SamplerCustomAdvanced and context windows).",
                       "Conditioning of the negative prompt (a schedule too when written as 'frame: prompt' lines).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The T5 encoder from EasyAnimateLoadT5 or EasyAnimateLoadPipeline."}),
            "schedule": ("STRING", {"default": DEFAULT_SCHEDULE, "multiline": True, "dynamicPrompts": True,
                                    "tooltip": "One 'frame: prompt' line per keyframe, frames ascending from 0 "
                                               "(e.g. '0: spring' and '120: autumn'); blank lines and '#' comments "
                                               "are ignored. Frames before the first keyframe hold its prompt, "
                                               "frames after the last hold the last."}),
            "negative_prompt": ("STRING", {"default": DEFAULT_NEGATIVE_PROMPT, "multiline": True,
                                           "dynamicPrompts": True,
                                           "tooltip": "What to steer away from (cfg > 1): one prompt for all "
                                                      "frames, or a schedule when its first line starts with "
                                                      "'frame:'."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "linear", "tooltip":
                              "linear: blend the embeddings between keyframes; hold: switch at each keyframe."}),
            "frames": ("INT", {"default": 80, "min": 1, "max": 4096, "tooltip":
                               "Frames of the video (as in the latent): keyframes must lie in 0..frames-1."}),
        }}

    def encode(self, clip, schedule, negative_prompt, interpolation, frames):
        if clip is None:
            raise ValueError(f"{NODE}: the clip input is None (is a CLIP connected? a LoRA loader without its "
                             f"optional clip input outputs None)")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{NODE}: interpolation must be one of {INTERPOLATIONS}, found {interpolation!r}")
        try:  # parse both before encoding anything, so a bad line fails fast
            parse_schedule(schedule, frames, name="schedule")
            negative = negative_prompt if looks_like_schedule(negative_prompt) else None
            if negative is not None:
                parse_schedule(negative, frames, name="negative_prompt")
        except ScheduleError as e:
            raise ScheduleError(f"{NODE}: {e}") from None
        positive = schedule_conditioning(clip, schedule, frames, interpolation, "schedule")
        if negative is None:
            # one prompt for every frame, as a one-keyframe schedule so positive and negative batch together
            embeds, extras = encode(clip, negative_prompt)[0]
            mask = extras.get("attention_mask")
            neg_schedule = PromptSchedule(embeds, None if mask is None else mask.reshape(1, -1), [0], [0], frames,
                                          interpolation, prompts=[negative_prompt])
            negative_cond = [[embeds, {**extras, SCHEDULE_KEY: neg_schedule}]]
        else:
            negative_cond = schedule_conditioning(clip, negative, frames, interpolation, "negative_prompt")
        sched = positive[0][1][SCHEDULE_KEY]
        estimate = sched.memory_estimate()
        log.info("%s: %d keyframes, %d distinct prompts over %d frames: %.1f MB stored (one tensor per frame would "
                 "be %.1f MB)", NODE, len(sched.key_frames), sched.embeds.shape[0], frames, estimate["stored"] / 2**20,
                 estimate["per_frame_copies"] / 2**20)
        return (positive, negative_cond)


NODE_CLASS_MAPPINGS = {NODE: EasyAnimatePromptSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {NODE: "EasyAnimate Prompt Schedule"}
