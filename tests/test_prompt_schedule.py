"""Prompt schedules (easyanimate_model.prompt_schedule): parsing, per-frame states, blending, shared memory."""
import pytest
import torch

from easyanimate_model.prompt_schedule import (FrameContexts, Keyframe, PromptSchedule, ScheduleError, check_frames,
                                               looks_like_schedule, parse_schedule)
from test_transformer import model3d  # noqa: F401 (fixture: the tiny 3D model of the fixture files)

TOKENS, CHANNELS = 6, 4


def fake_encoder(lengths):
    """encode(prompt) -> (embeds [1, L, C], mask [1, L]) with `lengths[prompt]` real tokens, distinct per prompt."""
    calls = []

    def encode(prompt):
        calls.append(prompt)
        g = torch.Generator().manual_seed(sum(map(ord, prompt)))
        mask = torch.zeros(1, TOKENS)
        mask[0, :lengths.get(prompt, TOKENS)] = 1
        return torch.randn(1, TOKENS, CHANNELS, generator=g), mask

    encode.calls = calls
    return encode


def schedule(text, frames=240, interpolation="linear", lengths=None):
    encode = fake_encoder(lengths or {})
    return PromptSchedule.from_keyframes(parse_schedule(text, frames), encode, frames, interpolation), encode


def test_parse_formats_comments_and_colons_in_prompts():
    text = '# seasons\n\n0: spring, pink flowers\n"80": "summer: green",\n  160 :autumn\n'
    assert parse_schedule(text, 240) == [Keyframe(0, "spring, pink flowers", 3), Keyframe(80, "summer: green", 4),
                                         Keyframe(160, "autumn", 5)]
    assert looks_like_schedule(text) and looks_like_schedule("12: x")
    assert not looks_like_schedule("blurry, low quality") and not looks_like_schedule("text: watermark")


@pytest.mark.parametrize("text, message", [
    ("0: a\n10: b\n5: c", "schedule line 3: frame 5 comes after frame 10 (line 2)"),
    ("0: a\n\n0: b", "schedule line 3: duplicate frame 0 (already on line 1)"),
    ("-4: a", "schedule line 1: frame -4 is negative"),
    ("0: a\n240: b", "schedule line 2: frame 240 is past the video (240 frames: 0..239)"),
    ("0: a\n10:   ", "schedule line 2: empty prompt for frame 10"),
    ('0: a\n10: ""', "schedule line 2: empty prompt for frame 10"),
    ("0: a\nten: b", "schedule line 2: expected 'frame: prompt'"),
    ("0: a\n1.5: b", "schedule line 2: expected 'frame: prompt'"),
    ("0 a", "schedule line 1: expected 'frame: prompt'"),
    ("\n# only a comment\n", "schedule: no keyframes"),
])
def test_bad_schedules_name_the_line(text, message):
    with pytest.raises(ScheduleError) as e:
        parse_schedule(text, 240)
    assert message in str(e.value)


def test_check_frames_against_the_latent():
    s, _ = schedule("0: a\n100: b", frames=240)
    check_frames(s, 101)
    with pytest.raises(ScheduleError, match=r"schedule line 2: keyframe 100 is past the video \(80 frames"):
        check_frames(s, 80)


def test_states_linear_hold_and_edges():
    s, _ = schedule("10: a\n20: b\n30: a", frames=40)
    st = s.states([0, 10, 15, 20, 25, 30, 39])
    assert st == [(0, 0, 0.0), (0, 0, 0.0), (0, 1, 0.5), (1, 1, 0.0), (1, 0, 0.5), (0, 0, 0.0), (0, 0, 0.0)]
    h, _ = schedule("10: a\n20: b\n30: a", frames=40, interpolation="hold")
    assert h.states([0, 15, 19, 20, 29, 30, 500]) == [(0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0), (1, 1, 0.0),
                                                     (1, 1, 0.0), (0, 0, 0.0), (0, 0, 0.0)]


def test_one_keyframe_is_the_prompt_itself():
    s, encode = schedule("0: a snowy forest", frames=240)
    e, m = encode("a snowy forest")
    assert s.is_uniform()
    ctx = s.frame_contexts(range(240))
    assert ctx.embeds.shape[0] == 1 and ctx.uniform_per_video(240)
    per_video, mask = ctx.per_video(240)
    assert torch.equal(per_video, e) and torch.equal(mask, m)


def test_same_prompt_is_encoded_once_and_shared():
    s, encode = schedule("0: spring\n80: summer\n160: spring\n200: summer", frames=240)
    assert encode.calls == ["spring", "summer"] and s.embeds.shape[0] == 2
    h, _ = schedule("0: spring\n80: summer\n160: spring", frames=240, interpolation="hold")
    ctx = h.frame_contexts(range(240))
    assert ctx.embeds.shape[0] == 2  # 240 frames, two tensors
    assert ctx.index.tolist() == [0] * 80 + [1] * 80 + [0] * 80


def test_linear_blend_is_smooth_and_exact_at_keyframes():
    s, encode = schedule("0: spring\n120: autumn", frames=240, lengths={"spring": 3, "autumn": 5})
    e, m = s.frame_embeddings()
    ea, ma = encode("spring")
    eb, mb = encode("autumn")
    assert torch.equal(e[0], ea[0]) and torch.equal(m[0], ma[0])
    assert torch.equal(e[120], eb[0]) and torch.equal(e[239], eb[0]) and torch.equal(m[200], mb[0])
    torch.testing.assert_close(e[30], 0.75 * ea[0] + 0.25 * eb[0])
    # tokens only in "autumn" fade in through the mask
    torch.testing.assert_close(m[30], torch.tensor([1, 1, 1, 0.25, 0.25, 0]))
    # smooth: neighbouring frames differ by about 1/120 of the whole change, never more than twice that
    step = (e[1:121] - e[:120]).flatten(1).norm(dim=1)
    total = (eb[0] - ea[0]).norm()
    assert step.max() < 2 * total / 120 and step.min() > 0
    distance_to_start = (e[:121] - ea[0]).flatten(1).norm(dim=1)
    assert (distance_to_start[1:] > distance_to_start[:-1]).all()  # monotone along the transition


def test_frame_contexts_build_only_distinct_states_of_the_window():
    s, _ = schedule("0: a\n100: b", frames=240)
    ctx = s.frame_contexts(range(40, 120))  # 60 blend frames + 20 frames at/after b's keyframe
    assert ctx.embeds.shape[0] == 61 and ctx.index.shape == (80,)
    e, _ = s.frame_embeddings(range(40, 120))
    torch.testing.assert_close(ctx.embeds[ctx.index], e)


def test_frame_contexts_cat_offsets_and_pads():
    a = FrameContexts(torch.ones(1, 3, 2), None, torch.zeros(4, dtype=torch.long))
    b = FrameContexts(torch.zeros(2, 5, 2), torch.ones(2, 5), torch.tensor([0, 0, 1, 1]))
    c = FrameContexts.cat([a, b])
    assert c.embeds.shape == (3, 5, 2) and c.index.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert c.mask.tolist()[0] == [1, 1, 1, 0, 0]
    assert not c.uniform_per_video(4) and c.uniform_per_video(2)


def test_memory_does_not_grow_with_frames_for_repeated_prompts():
    s, _ = schedule("0: spring\n80: summer\n160: autumn", frames=240, interpolation="hold")
    one = TOKENS * CHANNELS * 4 + TOKENS * 4
    est = s.memory_estimate(window=80)
    assert s.nbytes() == est["stored"] == 3 * one
    assert est["per_frame_copies"] == 240 * one
    assert est["per_call"] <= 2 * one  # a window spans at most two held prompts
    linear = schedule("0: spring\n80: summer\n160: autumn", frames=240)[0].memory_estimate(window=80)
    assert linear["stored"] == 3 * one and linear["per_call"] <= 81 * one


# -- the transformer with per-frame contexts ------------------------------------------------------------------------

def video_inputs(model, batch=2, frames=4, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.config.patch_size * model.config.motion_module.block_size
    x = torch.randn(batch * frames, 4, 2 * p, 2 * p, generator=g)
    texts = torch.randn(3, tokens, model.config.caption_channels, generator=g)
    masks = torch.ones(3, tokens)
    masks[1, 5:] = 0
    masks[2, 3:] = 0
    return x, torch.tensor([500.0] * batch), texts, masks


def test_uniform_frame_contexts_equal_the_per_video_prompt_exactly(model3d):
    x, t, texts, masks = video_inputs(model3d)
    with torch.no_grad():
        plain = model3d.forward_frames(x, t, texts[1:3], masks[1:3], num_frames=4)
        table = FrameContexts(texts, masks, torch.tensor([1] * 4 + [2] * 4))
        assert torch.equal(model3d.forward_frames(x, t, table, num_frames=4), plain)
        # one tensor per frame holding the same prompt: the same result up to float rounding
        per_frame = model3d.forward_frames(x, t, texts[[1] * 4 + [2] * 4], masks[[1] * 4 + [2] * 4],
                                              num_frames=4)
        torch.testing.assert_close(per_frame, plain, rtol=1e-5, atol=1e-5)


def test_each_frame_cross_attends_to_its_own_prompt(model3d):
    """Without the motion module frames are independent: frame f under a per-frame table equals frame f of the whole
    video run with frame f's prompt."""
    x, t, texts, masks = video_inputs(model3d, batch=2, frames=4)
    index = torch.tensor([0, 1, 2, 1, 2, 2, 0, 0])
    with torch.no_grad():
        out = model3d.forward_frames(x, t, FrameContexts(texts, masks, index), num_frames=4, temporal=False)
        for prompt in range(3):
            ref = model3d.forward_frames(x, t, texts[[prompt, prompt]], masks[[prompt, prompt]], num_frames=4,
                                            temporal=False)
            rows = index == prompt
            torch.testing.assert_close(out[rows], ref[rows], rtol=1e-5, atol=1e-5)
        # and with the motion module the prompts still differ per frame (frames interact, so only a smoke check)
        full = model3d.forward_frames(x, t, FrameContexts(texts, masks, index), num_frames=4)
        assert full.shape == out.shape and torch.isfinite(full).all()


def test_blended_masks_are_soft_and_continuous(model3d):
    x, t, texts, masks = video_inputs(model3d, batch=1, frames=4)
    s = PromptSchedule(texts[1:3], masks[1:3], [0, 100], [0, 1], num_frames=101)
    outs = []
    with torch.no_grad():
        for w_frame in (0, 1, 50, 99, 100):
            ctx = s.frame_contexts([w_frame] * 4)
            outs.append(model3d.forward_frames(x, t[:1], ctx, num_frames=4))
        ref_a = model3d.forward_frames(x, t[:1], texts[1:2], masks[1:2], num_frames=4)
        ref_b = model3d.forward_frames(x, t[:1], texts[2:3], masks[2:3], num_frames=4)
    assert torch.equal(outs[0], ref_a) and torch.equal(outs[-1], ref_b)
    jump = (ref_b - ref_a).abs().max()
    assert (outs[1] - ref_a).abs().max() < 0.05 * jump and (outs[3] - ref_b).abs().max() < 0.05 * jump


def test_bad_context_shapes_are_refused(model3d):
    x, t, texts, masks = video_inputs(model3d, batch=2, frames=4)
    with pytest.raises(ValueError, match=r"\[B=2, L, .*\[B\*F=8, L"):
        model3d.forward_frames(x, t, texts, masks, num_frames=4)
    with pytest.raises(ValueError, match="one entry per frame row"):
        model3d.forward_frames(x, t, FrameContexts(texts, masks, torch.zeros(4, dtype=torch.long)), num_frames=4)


def test_conditioning_memory_at_240_frames_with_three_t5_xxl_prompts():
    """The numbers of the closing note: T5-XXL (120 tokens x 4096, fp32), 240 frames, 3 seasons, 80-frame windows."""
    embeds, masks = torch.empty(3, 120, 4096, device="meta"), torch.empty(3, 120, device="meta")
    one = 120 * 4096 * 4 + 120 * 4
    for interpolation, per_call in (("hold", 2), ("linear", 80)):
        s = PromptSchedule(embeds, masks, [0, 120, 239], [0, 1, 2], 240, interpolation)
        est = s.memory_estimate(window=80)
        assert s.nbytes() == est["stored"] == 3 * one == 5_899_680  # 5.6 MiB
        assert est["per_frame_copies"] == 240 * one == 471_974_400  # 450 MiB: 80x more
        assert est["per_call"] == per_call * one  # materialised per window, freed after the call
