"""Long videos and video-to-video in the real ComfyUI server (`comfy` fixture): the video VAE encode node, context
windows (EasyAnimateContextOptions on core's context-window machinery), FreeNoise, and the sampler's denoise."""
import random

import pytest
import torch

from comfy_client import PromptRejected
from easyanimate_model.vae import fit_frames, map_frame_chunks
from easyanimate_model.sampling import SCHEDULERS
from test_nodes_pipeline import FRAMES, SIZE, execution_error, graph, run_ok, saved_latent, steps_for


def image_source(width=SIZE, height=SIZE, frames=FRAMES, node="20"):
    """A core node making an IMAGE batch of `frames` plain-colour frames."""
    return {node: {"class_type": "EmptyImage",
                   "inputs": {"width": width, "height": height, "batch_size": frames, "color": 0x4080c0}}}


def encode_node(images, size="error", chunk=3, vae="1"):
    return {"class_type": "EasyAnimateVAEEncodeVideo",
            "inputs": {"vae": [vae, 2], "images": images, "frames_per_chunk": chunk, "size": size}}


def save_latent(samples, prefix="long/latent"):
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


# ---- library helpers ----------------------------------------------------------------------------------------------
def test_map_frame_chunks_equals_one_call_and_reports_progress():
    x = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    seen, calls = [], []

    def fn(part):
        calls.append(part.shape[0])
        return part * 2

    out = map_frame_chunks(fn, x, 3, progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(out, x * 2) and calls == [3, 3, 1] and seen == [(3, 7), (6, 7), (7, 7)]
    with pytest.raises(ValueError, match="chunk: expected a positive"):
        map_frame_chunks(fn, x, 0)


def test_fit_frames_modes():
    images = torch.rand(2, 70, 100, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"100x70 .*multiples of 32.*96x64"):
        fit_frames(images, 32, "error")
    crop = fit_frames(images, 32, "center crop")
    assert crop.shape == (2, 64, 96, 3) and torch.equal(crop, images[:, 3:67, 2:98])
    resized = fit_frames(images, 32, "resize")
    assert resized.shape == (2, 64, 96, 3) and 0 <= resized.min() and resized.max() <= 1
    ok = torch.rand(1, 64, 32, 3)
    assert fit_frames(ok, 32, "error") is ok
    with pytest.raises(ValueError, match="size mode"):
        fit_frames(images, 32, "stretch")


# ---- VAE encode node ----------------------------------------------------------------------------------------------
def decoded_frames(g, node="20"):
    """Adds frames with content (the decoded sampler output): plain colours make GroupNorm divide by ~0 variance,
    which turns rounding into visible batch-size dependence."""
    g[node] = {"class_type": "EasyAnimateVAEDecode",
               "inputs": {"vae": ["1", 2], "samples": ["5", 0], "frames_per_chunk": 4, "tiled": False}}
    return g


def test_vae_encode_video_matches_core_encode_and_keeps_frames(comfy):
    g = decoded_frames(graph(seed=random.randint(0, 2**31), steps=2))
    g["21"] = encode_node(["20", 0], chunk=3)
    g["22"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["1", 2]}}
    g["23"] = save_latent(["21", 0], "long/ours")
    g["24"] = save_latent(["22", 0], "long/core")
    # a sampler fed the encoded latent makes as many frames (it reads the frame count from the latent)
    g["25"] = {**g["5"], "inputs": {**g["5"]["inputs"], "latent": ["21", 0]}}
    g["26"] = save_latent(["25", 0], "long/resampled")
    result = run_ok(comfy, g)
    ours, core = saved_latent(comfy, result, "23"), saved_latent(comfy, result, "24")
    assert ours.shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(ours, core, rtol=0, atol=1e-5)
    assert saved_latent(comfy, result, "26").shape == ours.shape


def test_vae_encode_video_size_check_and_fit(comfy):
    g = {**graph(), **image_source(width=70, height=64)}
    g = {k: g[k] for k in ("1", "20")}
    g["21"] = encode_node(["20", 0])
    g["23"] = save_latent(["21", 0])
    message = execution_error(comfy, g)
    assert "EasyAnimateVAEEncodeVideo: images: frames are 70x64" in message and "64x64" in message
    for size in ("center crop", "resize"):
        g["21"] = encode_node(["20", 0], size=size)
        latent = saved_latent(comfy, run_ok(comfy, g), "23")
        assert latent.shape == (FRAMES, 4, 8, 8)


# ---- context windows ----------------------------------------------------------------------------------------------
def test_freenoise_repeats_shuffled_window_noise():
    from easyanimate_model.context import freenoise

    noise = torch.randn(23, 2, 3, generator=torch.Generator().manual_seed(0))
    out = freenoise(noise, 8, 2, torch.Generator().manual_seed(1))
    assert torch.equal(out[:8], noise[:8]) and not torch.equal(out, noise)
    # blocks of 6 new frames, each a permutation of the frames 8 earlier
    for start in (8, 14, 20):
        block = out[start:start + 6]
        source = out[start - 8:start - 8 + block.shape[0]]
        assert sorted(map(tuple, block.flatten(1).tolist())) == sorted(map(tuple, source.flatten(1).tolist()))
    assert torch.equal(freenoise(noise[:8], 8, 2), noise[:8])  # fits in one window: unchanged
    assert torch.equal(freenoise(noise, 8, 2, torch.Generator().manual_seed(1)), out)
    with pytest.raises(ValueError, match="overlap"):
        freenoise(noise, 8, 8)


def write_latent(comfy, name, latent):
    """A .latent file in the server's input folder (core LoadLatent reads it unscaled)."""
    from safetensors.torch import save_file
    folder = comfy.base_dir / "input"
    folder.mkdir(exist_ok=True)
    save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])},
              str(folder / name))
    return name


def smooth_latent(frames, seed=0):
    """Frames that change slowly: one random image plus a small, linearly growing second one."""
    g = torch.Generator().manual_seed(seed)
    base, drift = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g), torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    return base + drift * torch.linspace(0, 1, frames).view(-1, 1, 1, 1)


def windowed_graph(latent_file, context=None, seed=3, steps=3, add_noise="disable", sampler="euler", cfg=6.0):
    """Pipeline -> motion module -> (context options) -> KSamplerAdvanced on a loaded latent -> SaveLatent."""
    g = graph()
    g["4"] = {"class_type": "LoadLatent", "inputs": {"latent": latent_file}}
    model = ["2", 0]
    if context is not None:
        g["9"] = {"class_type": "EasyAnimateContextOptions", "inputs": {"model": ["2", 0], **context}}
        model = ["9", 0]
    g["5"] = {"class_type": "KSamplerAdvanced",
              "inputs": {"model": model, "add_noise": add_noise, "noise_seed": seed, "steps": steps, "cfg": cfg,
                         "sampler_name": sampler, "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1],
                         "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 10000,
                         "return_with_leftover_noise": "disable"}}
    return g


def context(length, overlap=0, schedule="standard_static", fuse="pyramid", freenoise=True):
    return {"context_length": length, "context_overlap": overlap, "context_schedule": schedule, "fuse_method": fuse,
            "freenoise": freenoise, "context_stride": 1, "closed_loop": False}


def test_context_length_covering_the_video_equals_no_windows(comfy):
    name = write_latent(comfy, "long_cover.latent", smooth_latent(FRAMES))
    seed = random.randint(0, 2**31)
    plain = saved_latent(comfy, run_ok(comfy, windowed_graph(name, seed=seed, add_noise="enable")))
    for length in (FRAMES, FRAMES + 5):
        windowed = saved_latent(comfy, run_ok(comfy, windowed_graph(name, context(length, 2), seed=seed,
                                                                    add_noise="enable")))
        assert torch.equal(plain, windowed), length


def test_each_window_is_a_whole_video(comfy):
    """Batched windows (no overlap) of 8 over 16 frames: each half comes out exactly as that half sampled alone, so
    the motion module sees 8-frame videos and the temporal position encoding restarts in the second window."""
    frames = 16
    full = smooth_latent(frames, seed=1)
    halves = [write_latent(comfy, f"long_half{i}.latent", full[i * 8:(i + 1) * 8]) for i in (0, 1)]
    name = write_latent(comfy, "long_full.latent", full)
    windowed = saved_latent(comfy, run_ok(comfy, windowed_graph(name, context(8, 0, "batched", "flat"))))
    for i, half in enumerate(halves):
        alone = saved_latent(comfy, run_ok(comfy, windowed_graph(half)))
        torch.testing.assert_close(windowed[i * 8:(i + 1) * 8], alone, rtol=0, atol=1e-5)
    unwindowed = saved_latent(comfy, run_ok(comfy, windowed_graph(name)))
    assert not torch.allclose(windowed, unwindowed, atol=1e-3)


def frame_jumps(latent):
    return (latent[1:] - latent[:-1]).abs().mean(dim=(1, 2, 3))


def test_overlapping_windows_blend_without_seams(comfy):
    """Smooth input, windows of 8 with overlap 4 over 20 frames: the frame-to-frame change at window edges is no
    larger than inside a window. Without overlap (batched) the same edges jump: the check can fail."""
    frames, length = 20, 8
    name = write_latent(comfy, "long_seams.latent", smooth_latent(frames, seed=2))
    blended = frame_jumps(saved_latent(comfy, run_ok(comfy, windowed_graph(name, context(length, 4)))))
    edges = set(range(4, frames - length + 1, 4))  # window starts of the static schedule after the first: 4, 8, 12
    edge_pairs = sorted({s - 1 for s in edges} | {s + length - 1 for s in edges if s + length < frames})
    inside = [i for i in range(frames - 1) if i not in edge_pairs]
    assert frame_jumps(saved_latent(comfy, run_ok(comfy, windowed_graph(name))))[edge_pairs].max() > 0
    assert blended[edge_pairs].max() <= blended[inside].max(), (blended.tolist(), edge_pairs)
    batched = frame_jumps(saved_latent(comfy, run_ok(comfy, windowed_graph(name, context(length, 0, "batched")))))
    batched_inside = [i for i in range(frames - 1) if (i + 1) % length]
    assert batched[[length - 1, 2 * length - 1]].max() > batched[batched_inside].max(), batched.tolist()


def test_easyanimate_sampler_with_context_windows(comfy):
    seed = random.randint(0, 2**31)
    plain = saved_latent(comfy, run_ok(comfy, graph(seed=seed, sampler="DPM++")))
    g = graph(seed=seed, sampler="DPM++")
    g["9"] = {"class_type": "EasyAnimateContextOptions", "inputs": {"model": ["2", 0], **context(FRAMES, 3)}}
    g["5"]["inputs"]["model"] = ["9", 0]
    assert torch.equal(saved_latent(comfy, run_ok(comfy, g)), plain)  # the video fits one window
    g["9"]["inputs"].update(context(4, 2, "standard_uniform"))
    windowed = saved_latent(comfy, run_ok(comfy, g))
    assert windowed.shape == plain.shape and torch.isfinite(windowed).all() and not torch.allclose(windowed, plain)
    g["4"]["inputs"]["batch_size"] = 2
    assert "context windows run one video at a time" in execution_error(comfy, g)
    g["9"]["inputs"].update(context(4, 4))
    with pytest.raises(PromptRejected, match="context_overlap 4 must be smaller than context_length 4"):
        comfy.queue(g)


# ---- video-to-video: denoise -------------------------------------------------------------------------------------


def test_library_denoise_endpoints():
    import easyanimate_model as ea

    calls = []

    def model(x, t, e, m):
        calls.append(float(t[0]))
        return torch.zeros(x.shape[0], 8, *x.shape[2:])

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 2, 2, generator=g), torch.randn(1, 4, 3, 2, 2, generator=g)
    embeds = torch.zeros(1, 2, 8)
    kw = dict(steps=10, guidance_scale=1.0, prompt_embeds=embeds, latents=noise, init_latents=x0)
    assert ea.sample(model, "DDIM", denoise=0.0, **kw) is x0 and calls == []
    ea.sample(model, "DDIM", denoise=0.35, **kw)
    scheduler = ea.make_scheduler("DDIM")
    scheduler.set_timesteps(10)
    assert calls == [float(t) for t in scheduler.timesteps[-3:]]  # int(10 * 0.35) = 3 steps, as diffusers img2img
    for name in ("Euler", "DPM++", "DDIM"):
        full = ea.sample(model, name, denoise=1.0, **kw)
        t2v = ea.sample(model, name, **{**kw, "init_latents": None})
        assert torch.equal(full, t2v), name
    with pytest.raises(ValueError, match="PNDM runs only its whole schedule"):
        ea.sample(model, "PNDM", denoise=0.5, **kw)


def v2v_graph(seed, denoise_nodes):
    """t2v sampler "5" -> decoded frames "20" -> encoded "21"; extra sampler nodes on the encoded or empty latent."""
    g = decoded_frames(graph(seed=seed, steps=2))
    g["21"] = encode_node(["20", 0], chunk=4)
    for node, (sampler, denoise, source) in denoise_nodes.items():
        g[node] = {"class_type": "EasyAnimateSampler",
                   "inputs": {**g["5"]["inputs"], "latent": source, "seed": seed + 1, "sampler": sampler,
                              "steps": steps_for(sampler), "denoise": denoise}}
        g[node + "s"] = save_latent([node, 0], f"long/{node}")
    return g


def test_denoise_one_from_a_video_equals_text_to_video(comfy):
    seed = random.randint(0, 2**31)
    nodes = {}
    for i, sampler in enumerate(SCHEDULERS):
        nodes[f"3{i}"] = (sampler, 1.0, ["21", 0])
        nodes[f"4{i}"] = (sampler, 1.0, ["4", 0])
    result = run_ok(comfy, v2v_graph(seed, nodes))
    for i, sampler in enumerate(SCHEDULERS):
        assert torch.equal(saved_latent(comfy, result, f"3{i}s"), saved_latent(comfy, result, f"4{i}s")), sampler


def test_denoise_zero_returns_the_input_and_partial_denoise_stays_close(comfy):
    seed = random.randint(0, 2**31)
    nodes = {"30": ("DPM++", 0.0, ["21", 0]), "31": ("Euler", 0.2, ["21", 0])}
    g = v2v_graph(seed, nodes)
    g["22"] = save_latent(["21", 0], "long/encoded")
    g["32"] = {"class_type": "KSampler",
               "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["21", 0],
                          "seed": seed, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 0.0}}
    g["32s"] = save_latent(["32", 0], "long/ksampler0")
    result = run_ok(comfy, g)
    encoded = saved_latent(comfy, result, "22")
    assert torch.equal(saved_latent(comfy, result, "30s"), encoded)
    assert torch.equal(saved_latent(comfy, result, "32s"), encoded)
    g["31"]["inputs"]["steps"] = 10  # int(10 * 0.2) = 2 steps from sigma ~0.5: the input shows through
    partial = saved_latent(comfy, run_ok(comfy, g), "31s")
    full = saved_latent(comfy, run_ok(comfy, {**g, "31": {**g["31"], "inputs": {**g["31"]["inputs"], "denoise": 1.0}}}), "31s")
    assert (partial - encoded).abs().mean() < (full - encoded).abs().mean()
    # core KSampler's denoise on our model sampling: a low denoise keeps the input, 1.0 does not
    g["32"]["inputs"].update(steps=10, denoise=0.2)
    core_partial = saved_latent(comfy, run_ok(comfy, g), "32s")
    g["32"]["inputs"]["denoise"] = 1.0
    core_full = saved_latent(comfy, run_ok(comfy, g), "32s")
    assert (core_partial - encoded).abs().mean() < (core_full - encoded).abs().mean()


@pytest.mark.parametrize("sampler", ["Euler A", "DPM++", "DDIM"])
def test_partial_denoise_matches_library(comfy, sampler):
    """EasyAnimateSampler at denoise 0.5 = ea.sample(init_latents=..., denoise=0.5) (diffusers img2img rule)."""
    import easyanimate_model as ea
    from test_nodes_pipeline import MM, PIPELINE

    seed, steps, cfg = random.randint(0, 2**31), 4, 6.0
    g = v2v_graph(seed, {"30": (sampler, 0.5, ["21", 0])})
    g["30"]["inputs"]["steps"] = steps
    g["1"]["inputs"]["weight_dtype"] = "fp32"
    g["22"] = save_latent(["21", 0], "long/encoded")
    g["3"]["inputs"]["prompt"] = "A Red Panda, walking"
    result = run_ok(comfy, g)
    node, encoded = saved_latent(comfy, result, "30s"), saved_latent(comfy, result, "22")

    pipeline = comfy.models_dir / "diffusers" / PIPELINE
    model = ea.load_transformer(pipeline, motion_module=comfy.models_dir / "easyanimate" / MM)
    tokenizer, encoder = ea.load_text_encoder(pipeline, dtype=torch.float16)
    encoder = encoder.float()
    pos, pos_mask = ea.encode_prompt(tokenizer, encoder, "A Red Panda, walking")
    neg, neg_mask = ea.encode_prompt(tokenizer, encoder, "blurry")

    def video(rows):
        return rows.view(1, FRAMES, 4, SIZE // 8, SIZE // 8).transpose(1, 2)

    noise = video(torch.randn(node.shape, generator=torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad():
        lib = ea.sample(lambda x, t, e, m: model(x, t, e, m), scheduler=sampler, steps=steps, guidance_scale=cfg,
                        prompt_embeds=pos.float(), prompt_attention_mask=pos_mask, negative_prompt_embeds=neg.float(),
                        negative_prompt_attention_mask=neg_mask, latents=noise,
                        generator=torch.Generator().manual_seed(seed + 1),
                        init_latents=video(encoded * 0.18215), denoise=0.5)
    lib = lib.transpose(1, 2).reshape(node.shape) / 0.18215
    relative = ((node - lib).abs().max() / lib.abs().max()).item()
    assert relative < 5e-3, relative
