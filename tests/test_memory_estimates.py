"""easyanimate_model.memory estimates and the size rule in config.py (no server)."""
import pytest

from easyanimate_model import memory
from easyanimate_model.config import SIZE_MULTIPLE, TransformerConfig, size_error
from easyanimate_model.tiny import TINY_CONFIG


def test_size_rule_names_the_input_and_suggests_sizes():
    assert size_error(512, 448) is None
    assert size_error(500, 512) == ("width 500: EasyAnimate needs width and height as positive multiples of 32 "
                                    "pixels (try 512x512)")
    assert size_error(0, -32).startswith("width 0 and height -32:")
    assert size_error("abc", 64).startswith("width 'abc':")
    assert TransformerConfig().size_multiple() == SIZE_MULTIPLE == 32
    assert TransformerConfig(motion_module=None).size_multiple() == 16


def test_latent_and_image_bytes():
    assert memory.latent_bytes(1, 4096, 4096, 4096) == 4096 * 4 * 512 * 512 * 4  # the 17 GB of the issue
    assert memory.image_bytes(2, 64, 32) == 2 * 64 * 32 * 3 * 4


def test_transformer_estimate_grows_with_frames_and_backend():
    config = TransformerConfig()  # the released PixArt-XL-2-512x512 sizes
    est = {b: memory.transformer_bytes(config, 2, 80, 64, 64, 2, b) for b in memory.ATTENTION_BACKENDS}
    assert est["flash"] < est["chunked"] < est["math"]
    # without score matrices the activations are linear in the frames
    ratio = memory.transformer_bytes(config, 1, 160, 64, 64, 2) / memory.transformer_bytes(config, 1, 80, 64, 64, 2)
    assert ratio == pytest.approx(2.0)
    assert memory.transformer_bytes(TINY_CONFIG, 1, 8, 8, 8, temporal=False) < \
        memory.transformer_bytes(TINY_CONFIG, 1, 8, 8, 8, attention="math")
    assert memory.sampling_bytes(TINY_CONFIG, 1, 8, 8, 8) > memory.transformer_bytes(TINY_CONFIG, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="attention backend: expected one of"):
        memory.transformer_bytes(config, 1, 1, 8, 8, attention="sdpa")


def test_sampling_under_context_windows_counts_one_window_of_activations():
    config = TransformerConfig()
    whole = memory.sampling_bytes(config, 1, 240, 64, 64)
    windowed = memory.sampling_bytes(config, 1, 240, 64, 64, window=80)
    one_window = memory.sampling_bytes(config, 1, 80, 64, 64)
    latents = memory.SAMPLER_LATENT_COPIES * 240 * config.in_channels * 64 * 64 * 4
    # the latents of all 240 frames stay; the activations are those of an 80-frame call
    assert windowed - latents == one_window - latents * 80 // 240
    assert windowed < whole / 2


def test_gib_formatting():
    assert memory.gib(0) == "<0.1" and memory.gib(1.5 * memory.GiB) == "1.5" and memory.gib(586.2 * memory.GiB) == "587"
