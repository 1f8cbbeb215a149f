"""More of the pack's nodes in the real ComfyUI server (`comfy` fixture): a single-file T5 from text_encoders/, weight
dtypes, tiled / chunked decode, batches of videos, latent previews, the T5 part of LoRAs and chained LoRAs, a single
DiT file of the released width, core KSampler with the motion module, full 3D base checkpoints, and the input MODEL
staying unchanged."""
import io
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_nodes_pipeline import FRAMES, LORA, MM, PIPELINE, PORTRAIT, SIZE, graph, run_ok, saved_images, saved_latent

T5_FILE = "tiny_t5xxl_fp16.safetensors"


def relative_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def pixels(images):
    import numpy as np
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype="float32") / 255 for im in images]))


def decode_and_save(g, vae="1", samples="5", node="7", frames_per_chunk=1, tiled=False, prefix="more/frames"):
    g[node] = {"class_type": "EasyAnimateVAEDecode", "inputs": {"vae": [vae, 2], "samples": [samples, 0],
                                                                "frames_per_chunk": frames_per_chunk, "tiled": tiled}}
    g[node + "s"] = {"class_type": "SaveImage", "inputs": {"images": [node, 0], "filename_prefix": prefix}}
    return g


def t5_file_graph(seed, device="default"):
    g = graph(seed=seed, prompt="A Red Panda, walking")
    g["9"] = {"class_type": "EasyAnimateLoadT5", "inputs": {"source": f"text_encoders/{T5_FILE}", "device": device}}
    g["3"]["inputs"]["clip"] = ["9", 0]
    return g


@pytest.fixture(scope="module")
def t5_file(comfy):
    """The tiny pipeline T5 as one fp16 file with HF T5 key names (like t5xxl_fp16.safetensors) in text_encoders/."""
    folder = comfy.models_dir / "diffusers" / PIPELINE / "text_encoder"
    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))
    (comfy.models_dir / "text_encoders").mkdir(exist_ok=True)
    path = comfy.models_dir / "text_encoders" / T5_FILE
    save_file({k: v.half() for k, v in state.items()}, str(path))
    return path


def test_t5_from_text_encoders_file_matches_transformers(comfy, comfy_host_dir, t5_file):
    """EasyAnimateLoadT5 on a text_encoders/ file: ComfyUI's bundled tokenizer, the size read from the weights; the
    sampled latent equals the library path with transformers' T5 on the same tokenizer and weights."""
    import transformers

    import easyanimate_model as ea

    seed, steps, cfg = random.randint(0, 2**31), 2, 6.0
    node = saved_latent(comfy, run_ok(comfy, t5_file_graph(seed)))

    pipeline = comfy.models_dir / "diffusers" / PIPELINE
    tokenizer = transformers.T5TokenizerFast.from_pretrained(
        str(comfy_host_dir / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer"))
    encoder = transformers.T5EncoderModel.from_pretrained(str(pipeline / "text_encoder")).half().float().eval()
    model = ea.load_transformer(pipeline, motion_module=comfy.models_dir / "easyanimate" / MM)
    with torch.no_grad():
        pos, pos_mask = ea.encode_prompt(tokenizer, encoder, "A Red Panda, walking")
        neg, neg_mask = ea.encode_prompt(tokenizer, encoder, "blurry")
        noise = torch.randn(node.shape, generator=torch.Generator().manual_seed(seed))
        noise = noise.view(1, FRAMES, 4, SIZE // 8, SIZE // 8).transpose(1, 2)
        lib = ea.sample(lambda x, t, e, m: model(x, t, e, m), scheduler="Euler", steps=steps, guidance_scale=cfg,
                        prompt_embeds=pos, prompt_attention_mask=pos_mask, negative_prompt_embeds=neg,
                        negative_prompt_attention_mask=neg_mask, latents=noise)
    lib = lib.transpose(1, 2).reshape(node.shape) / 0.18215
    assert relative_diff(node, lib) < 5e-3
    # the folder's T5 (its own SentencePiece tokenizer: other token ids) gives another video
    folder_t5 = saved_latent(comfy, run_ok(comfy, graph(seed=seed, prompt="A Red Panda, walking")))
    assert not torch.allclose(node, folder_t5, atol=1e-3)


def test_t5_device_cpu_is_honoured(comfy, t5_file):
    result = run_ok(comfy, t5_file_graph(random.randint(0, 2**31), device="cpu"))
    assert torch.isfinite(saved_latent(comfy, result)).all()
    # comfy.sd.CLIP logs its patcher's devices (with --cpu every device is the CPU, so this checks the wiring only)
    assert "CLIP/text encoder model load device: cpu, offload device: cpu" in comfy.log_text()


def test_t5_fp8_file_like_t5xxl_fp8_e4m3fn(comfy, t5_file):
    name = "tiny_t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(t5_file)).items()},
              str(t5_file.parent / name))
    seed = random.randint(0, 2**31)
    g = t5_file_graph(seed)
    fp16 = saved_latent(comfy, run_ok(comfy, g))
    g["9"]["inputs"]["source"] = f"text_encoders/{name}"
    fp8 = saved_latent(comfy, run_ok(comfy, g))
    assert torch.isfinite(fp8).all() and not torch.equal(fp8, fp16)


def test_t5_file_of_another_model_is_refused(comfy):
    (comfy.models_dir / "text_encoders").mkdir(exist_ok=True)
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)},
              str(comfy.models_dir / "text_encoders" / "clip_l_like.safetensors"))
    g = graph()
    g["9"] = {"class_type": "EasyAnimateLoadT5",
              "inputs": {"source": "text_encoders/clip_l_like.safetensors", "device": "default"}}
    g["3"]["inputs"]["clip"] = ["9", 0]
    result = comfy.queue(g, timeout=120)
    assert result.error and result.error["node_type"] == "EasyAnimateLoadT5"
    message = result.error["exception_message"]
    assert "clip_l_like.safetensors" in message and "T5 encoder" in message, message


@pytest.fixture(scope="module")
def fp32_run(comfy):
    seed = random.randint(0, 2**31)
    g = graph(seed=seed)
    g["1"]["inputs"]["weight_dtype"] = "fp32"
    return seed, saved_latent(comfy, run_ok(comfy, g))


@pytest.mark.parametrize("weight_dtype,torch_dtype,tolerance", [
    ("fp16", "torch.float16", 5e-3), ("bf16", "torch.bfloat16", 3e-2), ("fp8_e4m3fn", "torch.float8_e4m3fn", 5e-1),
    ("fp8_e5m2", "torch.float8_e5m2", 5e-1)])
def test_weight_dtype_is_used_and_close_to_fp32(comfy, fp32_run, weight_dtype, torch_dtype, tolerance):
    seed, reference = fp32_run
    g = graph(seed=seed)
    g["1"]["inputs"]["weight_dtype"] = weight_dtype
    latent = saved_latent(comfy, run_ok(comfy, g))
    source = str(comfy.models_dir / "diffusers" / PIPELINE / "transformer")
    assert f"EasyAnimate transformer from {source}: weight dtype {torch_dtype}," in comfy.log_text()
    # rounded weights: near the fp32 video, never bit-identical
    assert not torch.equal(latent, reference)
    assert relative_diff(latent, reference) < tolerance


def test_tiled_and_chunked_decode(comfy):
    """320 px = 40 latent px: core's tiled decode really splits (tiles of 32 x 128 latent px); chunk sizes do not
    change the frames."""
    g = graph(seed=random.randint(0, 2**31), frames=2, width=320, height=320)
    for node, chunk, tiled in (("7", 1, False), ("8", 2, False), ("9", 1, True)):
        decode_and_save(g, node=node, frames_per_chunk=chunk, tiled=tiled, prefix=f"more/decode_{node}")
    result = run_ok(comfy, g)
    plain, chunked, tiled = (pixels(saved_images(comfy, result, n + "s")) for n in ("7", "8", "9"))
    assert plain.shape == (2, 320, 320, 3)
    assert (plain - chunked).abs().max() <= 1 / 255 + 1e-6
    assert tiled.shape == plain.shape
    # the tile seams are blended: close to the whole-frame decode, not identical
    assert (tiled - plain).abs().mean() < 0.02 and not torch.equal(tiled, plain)


@pytest.mark.parametrize("sampler", ["Euler", "Euler A"])
def test_batch_of_two_videos(comfy, sampler):
    """batch_size 2: one noise draw over all rows (as core KSampler), video i takes rows i*F..(i+1)*F-1, so video 0
    equals the batch-1 run with the same seed; Euler A too, as one CPU generator draws its step noise for the whole
    batch in the same order. Video 1 is no batch-1 run of any seed. Decode gives 2F frames."""
    seed = random.randint(0, 2**31)
    g = decode_and_save(graph(seed=seed, sampler=sampler), samples="5", prefix="more/batch2")
    g["4"]["inputs"]["batch_size"] = 2
    result = run_ok(comfy, g)
    both = saved_latent(comfy, result)
    assert both.shape == (2 * FRAMES, 4, SIZE // 8, SIZE // 8)
    first, second = both[:FRAMES], both[FRAMES:]
    assert not torch.allclose(first, second, atol=1e-3)
    assert len(saved_images(comfy, result, "7s")) == 2 * FRAMES
    single = saved_latent(comfy, run_ok(comfy, graph(seed=seed, sampler=sampler)))
    assert relative_diff(first, single) < 1e-4


def test_latent_previews_and_progress(comfy):
    steps = 3
    result = run_ok(comfy, graph(seed=random.randint(0, 2**31), steps=steps))
    progress = [m["data"]["value"] for m in result.messages
                if m.get("type") == "progress" and m["data"].get("node") == "5"]
    assert progress == list(range(1, steps + 1))
    assert len(result.previews) == steps
    from PIL import Image
    for frame in result.previews:
        event, image_type = struct.unpack(">II", frame[:8])
        assert (event, image_type) == (1, 1)  # PREVIEW_IMAGE, JPEG
        width, height = Image.open(io.BytesIO(frame[8:])).size  # the server scales it up to its preview size
        assert width == height > 0


def test_core_clip_text_encode_equals_ours_and_cfg_one_ignores_negative(comfy):
    seed = random.randint(0, 2**31)
    ours = saved_latent(comfy, run_ok(comfy, graph(seed=seed, prompt="A Red Panda, walking")))
    g = graph(seed=seed)
    g["3p"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "A Red Panda, walking"}}
    g["3n"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}}
    g["5"]["inputs"].update(positive=["3p", 0], negative=["3n", 0])
    del g["3"]
    assert torch.equal(saved_latent(comfy, run_ok(comfy, g)), ours)

    guided = graph(seed=seed, cfg=1.0)
    unguided = saved_latent(comfy, run_ok(comfy, guided))
    guided["3z"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 1]}}
    guided["5"]["inputs"]["negative"] = ["3z", 0]
    assert torch.equal(saved_latent(comfy, run_ok(comfy, guided)), unguided)
    assert not torch.allclose(unguided, ours, atol=1e-4)  # cfg 6 vs 1


def lora_graph(seed, loras, clip_from_lora=True, strict=None):
    """graph() with a chain of EasyAnimateLoraLoader (name, strength_model, strength_clip) after the motion module."""
    g = graph(seed=seed)
    model, clip = ["2", 0], ["1", 1]
    for i, (name, strength_model, strength_clip) in enumerate(loras):
        node = str(30 + i)
        g[node] = {"class_type": "EasyAnimateLoraLoader",
                   "inputs": {"model": model, "clip": clip, "lora_name": name, "strength_model": strength_model,
                              "strength_clip": strength_clip}}
        if strict is not None:
            g[node]["inputs"]["strict"] = strict
        model, clip = [node, 0], [node, 1]
    g["5"]["inputs"]["model"] = model
    if clip_from_lora:
        g["3"]["inputs"]["clip"] = clip
    return g


def test_lora_t5_part_and_strength_zero(comfy):
    seed = random.randint(0, 2**31)
    base = saved_latent(comfy, run_ok(comfy, graph(seed=seed)))
    zero = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 0.0, 0.0)])))
    assert torch.equal(zero, base)
    te_only = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 0.0, 1.0)])))
    assert not torch.allclose(te_only, base, atol=1e-4)  # only the conditioning changed
    # the same LoRA on the DiT only, with the clip not taken from the loader: the T5 part is not applied
    dit_only = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 1.0, 1.0)], clip_from_lora=False)))
    both = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 1.0, 1.0)])))
    assert not torch.allclose(dit_only, both, atol=1e-4)


def test_chained_loras_add_up(comfy):
    seed = random.randint(0, 2**31)
    once = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 1.0, 1.0)])))
    halves = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 0.5, 0.5), (LORA, 0.5, 0.5)])))
    half = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 0.5, 0.5)])))
    # LoRA deltas are linear in the strength: two chained halves are one full strength
    assert relative_diff(halves, once) < 1e-3
    assert not torch.allclose(half, once, atol=1e-3)


def test_lora_with_junk_keys_fails_strict_or_applies_the_rest_with_a_visible_warning(comfy):
    tensors = load_file(str(comfy.models_dir / "loras" / LORA))
    junk = {"lora_unet__transformer_blocks_0_attn1_to_nowhere": (64, 64),
            "lora_te_encoder_block_0_layer_0_SelfAttention_nowhere": (32, 32)}
    for name, (out_dim, in_dim) in junk.items():
        tensors[f"{name}.lora_down.weight"] = torch.ones(4, in_dim, dtype=torch.bfloat16)
        tensors[f"{name}.lora_up.weight"] = torch.ones(out_dim, 4, dtype=torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    save_file(tensors, str(comfy.models_dir / "loras" / "junk_lora.safetensors"))
    seed = random.randint(0, 2**31)
    clean = saved_latent(comfy, run_ok(comfy, lora_graph(seed, [(LORA, 1.0, 1.0)])))
    # strict (the default): the node fails and names every entry that does not apply
    result = comfy.queue(lora_graph(seed, [("junk_lora.safetensors", 1.0, 1.0)]), timeout=300)
    assert result.status_str == "error" and result.error["node_type"] == "EasyAnimateLoraLoader", result.error
    message = result.error["exception_message"]
    assert "2 LoRA entries do not apply" in message and all(name in message for name in junk), message
    # strict off: the rest is applied, and the warning is a ui output of the node (shown by web/js), not only a log
    result = run_ok(comfy, lora_graph(seed, [("junk_lora.safetensors", 1.0, 1.0)], strict=False))
    assert torch.equal(clean, saved_latent(comfy, result))
    warnings = result.outputs["30"]["easyanimate_lora_warnings"]
    assert "junk_lora.safetensors: 2 LoRA entries not applied" in warnings[0]
    assert all(name in warnings[0] for name in junk)


def test_single_dit_file_of_the_released_width(comfy):
    """EasyAnimateLoadDiT infers the config of a hidden-1152 file (16 heads x 72): one block, T5 width 32."""
    from easyanimate_model.config import TransformerConfig
    from easyanimate_model.tiny import random_transformer_state_dict

    config = TransformerConfig(num_layers=1, caption_channels=32, motion_module=None)
    assert config.inner_dim == 1152
    state = {k: v.half() for k, v in random_transformer_state_dict(config, seed=3).items()}
    (comfy.models_dir / "diffusion_models").mkdir(exist_ok=True)
    save_file(state, str(comfy.models_dir / "diffusion_models" / "narrow_pixart_1152.safetensors"))
    g = graph(seed=random.randint(0, 2**31), frames=1, motion_module=False)
    g["1"] = {"class_type": "EasyAnimateLoadDiT",
              "inputs": {"dit_name": "narrow_pixart_1152.safetensors", "weight_dtype": "default"}}
    g["9"] = {"class_type": "EasyAnimateLoadT5", "inputs": {"source": f"diffusers/{PIPELINE}", "device": "default"}}
    g["10"] = {"class_type": "EasyAnimateLoadPipeline",
               "inputs": {"pipeline": PIPELINE, "weight_dtype": "default", "text_encoder_device": "default"}}
    g["3"]["inputs"]["clip"] = ["9", 0]
    del g["2"]
    result = run_ok(comfy, decode_and_save(g, vae="10", prefix="more/narrow"))
    latent = saved_latent(comfy, result)
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all() and latent.abs().sum() > 0
    images = saved_images(comfy, result, "7s")
    assert len(images) == 1 and images[0].size == (SIZE, SIZE)
    assert "narrow_pixart_1152.safetensors: weight dtype" in comfy.log_text()


def ksampler_graph(seed, model):
    g = graph(seed=seed)
    g["5"] = {"class_type": "KSampler",
              "inputs": {"model": [model, 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["4", 0],
                         "seed": seed, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}}
    return g


def test_core_ksampler_uses_the_motion_module(comfy):
    """KSampler sets no frame count: the model takes one video per cond chunk (cond_or_uncond)."""
    seed = random.randint(0, 2**31)
    with_mm = saved_latent(comfy, run_ok(comfy, ksampler_graph(seed, "2")))
    without = saved_latent(comfy, run_ok(comfy, ksampler_graph(seed, "1")))
    assert with_mm.shape == without.shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(with_mm).all()
    assert not torch.allclose(with_mm, without, atol=1e-4)
    # without the motion module the frames are independent images: frame 0 does not depend on the others
    g = ksampler_graph(seed, "1")
    g["4"]["inputs"]["frames"] = 1
    one = saved_latent(comfy, run_ok(comfy, g))
    assert relative_diff(without[:1], one) < 1e-4


def test_full_3d_base_checkpoint_replaces_motion_module_too(comfy):
    """A full 3D checkpoint (2D + motion module) on the plain pipeline MODEL = motion module + 2D checkpoint."""
    models = comfy.models_dir / "easyanimate"
    full = {**load_file(str(models / PORTRAIT)), **load_file(str(models / MM))}
    save_file(full, str(models / "full_3d.safetensors"))
    seed = random.randint(0, 2**31)
    g = graph(seed=seed, sample_from="20")
    g["20"] = {"class_type": "EasyAnimateLoadBaseCheckpoint",
               "inputs": {"model": ["1", 0], "ckpt_name": "full_3d.safetensors"}}
    from_full = saved_latent(comfy, run_ok(comfy, g))
    g["20"]["inputs"] = {"model": ["2", 0], "ckpt_name": PORTRAIT}
    from_parts = saved_latent(comfy, run_ok(comfy, g))
    assert torch.equal(from_full, from_parts)


def test_input_model_unchanged_after_patching_nodes(comfy):
    """Sampling the plain MODEL after its motion-module + portrait clone has run gives the plain result."""
    seed = random.randint(0, 2**31)
    g = graph(seed=seed, sample_from="20")
    g["20"] = {"class_type": "EasyAnimateLoadBaseCheckpoint", "inputs": {"model": ["2", 0], "ckpt_name": PORTRAIT}}
    # the plain sampler takes the patched sampler's latent (only its shape is used), so it runs after it
    g["15"] = {"class_type": "EasyAnimateSampler", "inputs": dict(g["5"]["inputs"], model=["1", 0], latent=["5", 0])}
    g["16"] = {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": "more/plain_after"}}
    result = run_ok(comfy, g)
    plain_after = saved_latent(comfy, result, node="16")
    comfy.free()
    plain = saved_latent(comfy, run_ok(comfy, graph(seed=seed, motion_module=False)))
    assert torch.equal(plain_after, plain)
