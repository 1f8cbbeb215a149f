"""VAE loading (folders, single LDM/diffusers files) and frame-chunked decode/encode (docs/MODEL.md §C.6)."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_model.errors import EasyAnimateLoadError
from easyanimate_model.vae import SCALING_FACTOR, decode_latents, encode_frames, load_vae

TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)


def make_vae(seed=0, **config):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**TINY, **config}).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    make_vae().save_pretrained(str(root / "vae"))
    return root


def reference_decode(vae, latents):
    """All frames in one decode call: (b f) c h w, /0.18215, (x/2 + 0.5).clamp(0, 1)."""
    b, c, f, h, w = latents.shape
    frames = (latents / 0.18215).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    with torch.no_grad():
        video = vae.decode(frames).sample
    video = video.reshape(b, f, 3, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
    return (video / 2 + 0.5).clamp(0, 1)


def test_load_folder_and_pipeline(pipeline_dir):
    a = load_vae(pipeline_dir)
    b = load_vae(pipeline_dir / "vae", dtype=torch.float16)
    assert type(a).__name__ == "AutoencoderKL" and not a.training
    assert b.dtype == torch.float16
    assert torch.equal(a.decoder.conv_out.weight.half(), b.decoder.conv_out.weight)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16])
def test_decode_chunks_equal_whole(pipeline_dir, chunk):
    vae = load_vae(pipeline_dir)
    latents = torch.randn(2, 4, 5, 6, 8, generator=torch.Generator().manual_seed(0))
    video = decode_latents(vae, latents, chunk=chunk)
    assert video.shape == (2, 3, 5, 12, 16) and video.dtype == torch.float32 and video.device.type == "cpu"
    assert 0 <= video.min() and video.max() <= 1
    torch.testing.assert_close(video, reference_decode(vae, latents), rtol=0, atol=1e-5)
    # frame f of video b decodes latents[b, :, f] alone
    torch.testing.assert_close(video[1, :, 3], reference_decode(vae, latents[1:2, :, 3:4])[0, :, 0], rtol=0, atol=1e-5)


def test_tiled_decode_restores_setting(pipeline_dir):
    vae = load_vae(pipeline_dir)
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    video = decode_latents(vae, latents, tiled=True)
    assert video.shape == (1, 3, 2, 8, 8) and not vae.use_tiling
    # frames smaller than one tile decode exactly as untiled
    torch.testing.assert_close(video, decode_latents(vae, latents), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="latents: expected"):
        decode_latents(vae, latents[0])


def test_encode_frames(pipeline_dir):
    vae = load_vae(pipeline_dir)
    frames = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    mean = encode_frames(vae, frames, chunk=3, sample=False)
    assert mean.shape == (2, 4, 5, 8, 8)
    x = (frames * 2 - 1).permute(0, 2, 1, 3, 4).reshape(10, 3, 16, 16)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode() * SCALING_FACTOR
    torch.testing.assert_close(mean.permute(0, 2, 1, 3, 4).reshape(10, 4, 8, 8), expected, rtol=0, atol=1e-5)
    a = encode_frames(vae, frames, generator=torch.Generator().manual_seed(5))
    b = encode_frames(vae, frames, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def to_ldm_layout(sd, levels):
    """diffusers AutoencoderKL keys -> the original LDM / SD-checkpoint VAE keys (1x1 conv attention)."""
    out = {}
    for key, value in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for src, dst in attn.items():
            k = k.replace(f"mid_block.attentions.0.{src}.", f"mid.attn_1.{dst}.")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + k] = value.contiguous()
    return out


def test_single_file_ldm_and_diffusers_layouts(tmp_path):
    vae = make_vae(block_out_channels=(32, 64), norm_num_groups=32, seed=3)
    sd = vae.state_dict()
    ldm = tmp_path / "sd_vae.safetensors"
    save_file({**to_ldm_layout(sd, 2), "model.diffusion_model.x.weight": torch.zeros(1)}, str(ldm))
    flat = tmp_path / "diffusers_vae.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(flat))
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    for path in (ldm, flat):
        loaded = load_vae(path)
        assert list(loaded.config.block_out_channels) == [32, 64]
        for key, value in sd.items():
            assert torch.equal(loaded.state_dict()[key], value), (path.name, key)
        torch.testing.assert_close(decode_latents(loaded, latents), decode_latents(vae, latents), rtol=0, atol=0)


def test_load_errors(tmp_path, pipeline_dir):
    with pytest.raises(EasyAnimateLoadError, match="not found"):
        load_vae(tmp_path / "missing.safetensors")
    not_vae = tmp_path / "dit.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, str(not_vae))
    with pytest.raises(EasyAnimateLoadError, match=r"dit\.safetensors.*SD VAE"):
        load_vae(not_vae)
    with pytest.raises(EasyAnimateLoadError, match="config.json"):
        load_vae(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(EasyAnimateLoadError, match="AutoencoderKL.*UNet2DConditionModel"):
        load_vae(wrong)
