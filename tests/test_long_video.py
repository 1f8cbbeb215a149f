"""Long videos and video-to-video in the real ComfyUI server (`comfy` fixture): the video VAE encode node, context
windows (EasyAnimateContextOptions on core's context-window machinery), FreeNoise, and the sampler's denoise."""
import random

import pytest
import torch

from easyanimate_model.vae import fit_frames, map_frame_chunks
from test_nodes_pipeline import FRAMES, SIZE, execution_error, graph, run_ok, saved_latent


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
