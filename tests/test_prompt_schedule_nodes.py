"""EasyAnimate Prompt Schedule inside the real ComfyUI server: a one-keyframe schedule is exactly the plain prompt
(per sampler), each frame sees its own prompt (also per context window), bad schedules fail with the line number."""
import random

import pytest
import torch

from easyanimate_model.sampling import SCHEDULERS
from test_nodes_pipeline import FRAMES, MM, PIPELINE, SIZE, execution_error, run_ok, saved_latent, steps_for

NEGATIVE = "blurry, low quality"


def ksampler(sampler="euler", seed=3, cfg=6.0, model=("2", 0)):
    return {"class_type": "KSampler",
            "inputs": {"model": list(model), "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0],
                       "seed": seed, "steps": 2, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal",
                       "denoise": 1.0}}


def easyanimate_sampler(sampler="Euler", seed=3, cfg=6.0, model=("2", 0)):
    return {"class_type": "EasyAnimateSampler",
            "inputs": {"model": list(model), "positive": ["3", 0], "negative": ["3", 1], "latent": ["4", 0],
                       "seed": seed, "steps": steps_for(sampler), "cfg": cfg, "sampler": sampler}}


def graph(encode, sample, frames=FRAMES, batch=1, clip=("1", 1), extra=None):
    g = {
        "1": {"class_type": "EasyAnimateLoadPipeline",
              "inputs": {"pipeline": PIPELINE, "weight_dtype": "default", "text_encoder_device": "default"}},
        "2": {"class_type": "EasyAnimateLoadMotionModule", "inputs": {"model": ["1", 0], "motion_module_name": MM}},
        "3": dict(encode, inputs={"clip": list(clip), **encode["inputs"]}),
        "4": {"class_type": "EasyAnimateEmptyLatent",
              "inputs": {"width": SIZE, "height": SIZE, "frames": frames, "batch_size": batch}},
        "5": sample,
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "schedule_test/latent"}},
    }
    g.update(extra or {})
    return g


def plain(prompt):
    return {"class_type": "EasyAnimateTextEncode", "inputs": {"prompt": prompt, "negative_prompt": NEGATIVE}}


def scheduled(text, interpolation="linear", frames=FRAMES, negative=NEGATIVE):
    return {"class_type": "EasyAnimatePromptSchedule",
            "inputs": {"schedule": text, "negative_prompt": negative, "interpolation": interpolation,
                       "frames": frames}}


def latent_of(comfy, g):
    return saved_latent(comfy, run_ok(comfy, g))


@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_one_keyframe_equals_the_plain_prompt_easyanimate_sampler(comfy, sampler):
    seed = random.randint(0, 2**31)
    ref = latent_of(comfy, graph(plain("a red panda"), easyanimate_sampler(sampler, seed), batch=2))
    out = latent_of(comfy, graph(scheduled("0: a red panda"), easyanimate_sampler(sampler, seed), batch=2))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_one_keyframe_equals_the_plain_prompt_ksampler(comfy, sampler):
    seed = random.randint(0, 2**31)
    ref = latent_of(comfy, graph(plain("a red panda"), ksampler(sampler, seed)))
    out = latent_of(comfy, graph(scheduled("0: a red panda"), ksampler(sampler, seed)))
    assert torch.equal(out, ref)
    # a schedule that repeats the prompt is still one prompt
    out = latent_of(comfy, graph(scheduled("0: a red panda\n5: a red panda", "hold"), ksampler(sampler, seed)))
    assert torch.equal(out, ref)


def test_one_keyframe_equals_the_plain_prompt_sampler_custom_advanced(comfy):
    seed = random.randint(0, 2**31)

    def custom(encode):
        return graph(encode, {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
            "latent_image": ["4", 0]}}, extra={
            "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "11": {"class_type": "CFGGuider", "inputs": {"model": ["2", 0], "positive": ["3", 0],
                                                         "negative": ["3", 1], "cfg": 5.0}},
            "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "13": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "normal", "steps": 2,
                                                              "denoise": 1.0}}})

    assert torch.equal(latent_of(comfy, custom(scheduled("0: a red panda"))), latent_of(comfy, custom(plain("a red panda"))))


def test_one_keyframe_with_t5_lora_equals_the_plain_prompt(comfy):
    seed = random.randint(0, 2**31)
    lora = {"9": {"class_type": "EasyAnimateLoraLoader",
                  "inputs": {"model": ["2", 0], "clip": ["1", 1], "lora_name": "easyanimate_portrait_lora.safetensors",
                             "strength_model": 0.8, "strength_clip": 0.8}}}
    ref = latent_of(comfy, graph(plain("a red panda"), ksampler(seed=seed, model=("9", 0)), clip=("9", 1),
                                 extra=lora))
    out = latent_of(comfy, graph(scheduled("0: a red panda"), ksampler(seed=seed, model=("9", 0)), clip=("9", 1),
                                 extra=lora))
    assert torch.equal(out, ref)
    no_lora = latent_of(comfy, graph(scheduled("0: a red panda"), ksampler(seed=seed, model=("9", 0)), extra=lora))
    assert not torch.equal(no_lora, ref)  # the T5 LoRA really changes the conditioning


def frames_per_prompt(comfy, sample, schedule_text, prompts, split, extra=None, batch=1):
    """Without the motion module frames are denoised independently, so under a hold schedule frame f must equal
    frame f of the plain run of its own prompt: prompts[0] before `split`, prompts[1] from it on."""
    def run(encode):
        return latent_of(comfy, graph(encode, sample, batch=batch, extra=extra)).view(batch, FRAMES, -1)

    out = run(scheduled(schedule_text, "hold"))
    refs = [run(plain(p)) for p in prompts]
    torch.testing.assert_close(out[:, :split], refs[0][:, :split], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, split:], refs[1][:, split:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(refs[0][:, split:], refs[1][:, split:], atol=1e-3)  # the prompts do differ


def test_each_frame_sees_its_own_prompt(comfy):
    seed = random.randint(0, 2**31)
    frames_per_prompt(comfy, ksampler(seed=seed, model=("1", 0)), "0: a red panda\n5: a blue whale",
                      ["a red panda", "a blue whale"], 5)


def test_each_frame_sees_its_own_prompt_batch_of_videos(comfy):
    seed = random.randint(0, 2**31)
    frames_per_prompt(comfy, easyanimate_sampler("DDIM", seed=seed, model=("1", 0)),
                      "0: a red panda\n2: a blue whale", ["a red panda", "a blue whale"], 2, batch=2)


CONTEXT = {"9": {"class_type": "EasyAnimateContextOptions",
                 "inputs": {"model": ["1", 0], "context_length": 4, "context_overlap": 1,
                            "context_schedule": "standard_static", "fuse_method": "pyramid", "freenoise": False,
                            "context_stride": 1, "closed_loop": False}}}


@pytest.mark.parametrize("sample", [ksampler, easyanimate_sampler])
def test_each_context_window_sees_its_frames_prompts(comfy, sample):
    seed = random.randint(0, 2**31)
    frames_per_prompt(comfy, sample(seed=seed, model=("9", 0)), "0: a red panda\n3: a blue whale",
                      ["a red panda", "a blue whale"], 3, extra=CONTEXT)


def test_windows_with_the_motion_module_follow_the_schedule(comfy):
    seed = random.randint(0, 2**31)
    context = {"9": dict(CONTEXT["9"], inputs={**CONTEXT["9"]["inputs"], "model": ["2", 0]})}
    one = latent_of(comfy, graph(scheduled("0: a red panda"), easyanimate_sampler(seed=seed, model=("9", 0)),
                                 extra=context))
    ref = latent_of(comfy, graph(plain("a red panda"), easyanimate_sampler(seed=seed, model=("9", 0)),
                                 extra=context))
    assert torch.equal(one, ref)
    travel = latent_of(comfy, graph(scheduled("0: a red panda\n6: a blue whale"),
                                    easyanimate_sampler(seed=seed, model=("9", 0)), extra=context))
    assert torch.isfinite(travel).all() and not torch.equal(travel, ref)


def test_two_keyframes_change_the_video_with_the_motion_module(comfy):
    seed = random.randint(0, 2**31)
    a = latent_of(comfy, graph(plain("a red panda"), ksampler(seed=seed)))
    b = latent_of(comfy, graph(plain("a blue whale"), ksampler(seed=seed)))
    travel = latent_of(comfy, graph(scheduled("0: a red panda\n7: a blue whale"), ksampler(seed=seed)))
    assert torch.isfinite(travel).all()
    assert not torch.equal(travel, a) and not torch.equal(travel, b)
    # the scheduled negative works too
    neg = latent_of(comfy, graph(scheduled("0: a red panda\n7: a blue whale", negative="0: blurry\n4: dark"),
                                 ksampler(seed=seed)))
    assert torch.isfinite(neg).all() and not torch.equal(neg, travel)


@pytest.mark.parametrize("text, negative, message", [
    ("0: a\n6: b\n3: c", NEGATIVE, "schedule line 3: frame 3 comes after frame 6 (line 2)"),
    ("0: a\n0: b", NEGATIVE, "schedule line 2: duplicate frame 0 (already on line 1)"),
    ("-1: a", NEGATIVE, "schedule line 1: frame -1 is negative"),
    (f"0: a\n{FRAMES}: b", NEGATIVE, f"schedule line 2: frame {FRAMES} is past the video ({FRAMES} frames"),
    ("0: a\n\n4:", NEGATIVE, "schedule line 3: empty prompt for frame 4"),
    ("0: a", "0: blurry\nx: dark", "negative_prompt line 2: expected 'frame: prompt'"),
])
def test_bad_schedules_fail_with_the_line(comfy, text, negative, message):
    error = execution_error(comfy, graph(scheduled(text, negative=negative), ksampler()))
    assert "EasyAnimatePromptSchedule" in error and message in error, error


def test_keyframe_past_the_latent_fails_before_sampling(comfy):
    error = execution_error(comfy, graph(scheduled("0: a\n10: b", frames=16), ksampler()))
    assert f"keyframe 10 is past the video ({FRAMES} frames" in error and "line 2" in error, error
