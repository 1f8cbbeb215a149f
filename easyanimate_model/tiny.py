"""Tiny random models in the exact EasyAnimate v1 release layout (for tests and the demo).

`write_release_files(models_dir)` fills a ComfyUI models folder the way a user installs the real release:

    diffusers/PixArt-XL-2-512x512/   model_index.json, transformer/, text_encoder/ (sharded), tokenizer/ (spiece.model,
                                     no tokenizer.json), vae/, scheduler/
    easyanimate/easyanimate_v1_mm.safetensors       every "temporal" key of the 3D model, pe buffers, no metadata
    easyanimate/easyanimate_portrait.safetensors    another 2D DiT state dict, fp32
    loras/easyanimate_portrait_lora.safetensors     kohya LoRA (lora_unet__*, lora_te_*), rank 4, alpha 2, bf16

Every weight is random and non-zero (the motion module's proj_out and the LoRA up matrices included), so outputs
depend on every file. Deterministic for a given seed; the global RNG state is left untouched.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch
from torch import nn

from .config import MotionModuleConfig, TransformerConfig

# 2 blocks, 4 heads x 16 = 64 hidden, T5 width 32: the structure of tests/fixtures/easyanimate_v1_tiny.
TINY_CONFIG = TransformerConfig(
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=16,
    caption_channels=32,
    cross_attention_dim=64,
    motion_module=MotionModuleConfig(num_attention_heads=8, norm_num_groups=32,
                                     temporal_position_encoding_max_len=4096),
)

PIPELINE_NAME = "PixArt-XL-2-512x512"
MOTION_MODULE_FILE = "easyanimate_v1_mm.safetensors"
PORTRAIT_FILE = "easyanimate_portrait.safetensors"
LORA_FILE = "easyanimate_portrait_lora.safetensors"
LORA_RANK, LORA_ALPHA = 4, 2.0

# t5-v1_1-xxl layout at tiny size; vocab 32128 so any T5 tokenizer's ids (ComfyUI's own included) fit.
TINY_T5 = {"vocab_size": 32128, "d_model": TINY_CONFIG.caption_channels, "d_kv": 8, "d_ff": 64, "num_layers": 2,
           "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
           "is_gated_act": True, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "tie_word_embeddings": False,
           "architectures": ["T5EncoderModel"]}
TOKENIZER_VOCAB = 240
EXTRA_IDS = 100

# GroupNorm(32) everywhere: ComfyUI's own VAE class hard-codes 32 groups, so core VAEDecode can load this one too
TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 32}

# Sentences for the tiny SentencePiece model: the default prompts' words plus everyday English.
_CORPUS = """\
A snowy forest landscape with a dirt road running through it.
The road is flanked by trees covered in snow, and the ground is also covered in snow.
The sun is shining, creating a bright and serene atmosphere.
The road appears to be empty, and there are no people or animals visible in the video.
The style of the video is a natural landscape shot, with a focus on the beauty of the snowy forest.
Strange motion trajectory, a poor composition and deformed video, worst quality, normal quality.
Low quality, low resolution, duplicate and ugly.
A girl with delicate face is smiling. A portrait of a young woman with long hair.
A cat sits on a wooden table next to a cup of coffee in the morning light.
Waves crash on a sandy beach at sunset while birds fly over the ocean.
A city street at night with neon signs, cars and people walking in the rain.
A red car drives along a mountain road between green hills and blue sky.
An old man reads a book by the window; a dog sleeps on the floor.
Fireworks light up the dark sky above the river and the bridge.
Close up of flowers in a garden, bees moving from one flower to another.
Time lapse of clouds moving over a quiet lake surrounded by pine trees.
Children play football in the park on a warm summer afternoon.
A chef cooks vegetables in a busy kitchen, steam rising from the pan.
Snow falls slowly on the roofs of a small village in winter.
A horse runs across an open field under a cloudy grey sky.
The camera pans across a desert with tall rocks and golden sand.
A woman in a blue dress dances on the stage under bright lights.
Rain drops fall on the window glass; the street outside is blurry.
A small boat sails on calm water near the harbor at dawn.
An astronaut floats in space above the earth, stars shining behind him.
Autumn leaves in red, orange and yellow cover the forest floor.
High quality, detailed, sharp focus, cinematic lighting, smooth motion.
"""


def write_release_files(models_dir, vae: str = "tiny", seed: int = 0) -> dict:
    """Write the tiny release set into `models_dir` (a ComfyUI models folder); returns {name: path}.

    vae="tiny": a narrow 8x AutoencoderKL; vae="sd": the real sd-vae-ft-ema architecture, random, fp16 (~160 MB).
    """
    if vae not in ("tiny", "sd"):
        raise ValueError(f"vae: expected 'tiny' or 'sd', found {vae!r}")
    models_dir = Path(models_dir)
    pipeline = models_dir / "diffusers" / PIPELINE_NAME
    paths = {
        "pipeline": pipeline,
        "transformer": pipeline / "transformer",
        "text_encoder": pipeline / "text_encoder",
        "tokenizer": pipeline / "tokenizer",
        "vae": pipeline / "vae",
        "scheduler": pipeline / "scheduler",
        "motion_module": models_dir / "easyanimate" / MOTION_MODULE_FILE,
        "portrait": models_dir / "easyanimate" / PORTRAIT_FILE,
        "lora": models_dir / "loras" / LORA_FILE,
    }
    for key in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        paths[key].mkdir(parents=True, exist_ok=True)
    for key in ("motion_module", "lora"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer_sd = random_transformer_state_dict(TINY_CONFIG, seed)
        portrait_sd = random_transformer_state_dict(dataclasses.replace(TINY_CONFIG, motion_module=None), seed + 1)
        encoder = write_text_encoder(paths["text_encoder"], seed)
        write_vae(paths["vae"], vae)
    write_tokenizer(paths["tokenizer"])
    write_scheduler(paths["scheduler"])
    _write_json(pipeline / "model_index.json", {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": "0.22.0.dev0",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })

    from safetensors.torch import save_file

    config_2d = dataclasses.replace(TINY_CONFIG, motion_module=None).to_diffusers()
    _write_json(paths["transformer"] / "config.json", {**config_2d, "_diffusers_version": "0.22.0.dev0"})
    base_2d = {k: v for k, v in transformer_sd.items() if "temporal" not in k}
    save_file(base_2d, str(paths["transformer"] / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file({k: v for k, v in transformer_sd.items() if "temporal" in k}, str(paths["motion_module"]))
    save_file(portrait_sd, str(paths["portrait"]))
    write_kohya_lora(paths["lora"], portrait_sd, encoder.state_dict(), seed + 2)
    return paths


def random_transformer_state_dict(config: TransformerConfig, seed: int) -> dict:
    """State dict of `Transformer3DModel(config)` with every parameter random and non-zero (fp32, contiguous)."""
    from .transformer import Transformer3DModel

    model = Transformer3DModel(config)
    _randomize(model, torch.Generator().manual_seed(seed))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("scale_shift_table"):
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)  # fan-in scaling keeps activations O(1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def write_text_encoder(folder: Path, seed: int) -> nn.Module:
    """Tiny T5EncoderModel saved like the real folder: config.json + 2 safetensors shards + index json."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**TINY_T5)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(config).eval()
    config.save_pretrained(str(folder))
    # encoder.embed_tokens is tied to shared; like transformers' own save, only `shared.weight` is stored.
    sd = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    shards = [{"shared.weight": sd.pop("shared.weight")}, sd]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return encoder


def write_tokenizer(folder: Path) -> None:
    """spiece.model (tiny SentencePiece unigram, T5 ids: pad 0, </s> 1, <unk> 2) + the slow-tokenizer json files."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_writer=model, vocab_size=TOKENIZER_VOCAB,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    vocab = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "added_tokens.json", {tok: vocab + EXTRA_IDS - 1 - i for i, tok in enumerate(extra)})
    _write_json(folder / "tokenizer_config.json", {
        **special, "extra_ids": EXTRA_IDS, "model_max_length": 512, "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer", "clean_up_tokenization_spaces": True})


def write_vae(folder: Path, kind: str) -> None:
    from diffusers import AutoencoderKL

    from .vae import SD_VAE_CONFIG

    config = dict(SD_VAE_CONFIG)
    if kind == "tiny":
        config.update(TINY_VAE)
    vae = AutoencoderKL(**config)
    if kind == "sd":
        vae = vae.half()  # keeps the random SD-size VAE at ~160 MB on disk
    vae.save_pretrained(str(folder))


def write_scheduler(folder: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler

    # The PixArt folder's own scheduler config (v1 ignores it and builds its samplers from the yaml kwargs).
    DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear").save_config(str(folder))


def write_kohya_lora(path: Path, dit_sd: dict, t5_sd: dict, seed: int) -> None:
    """kohya LoRA as the reference writes it (docs/MODEL.md §B.6): every DiT Linear outside attn_temporal and every
    T5 self-attention / feed-forward Linear; `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`; bf16."""
    from safetensors.torch import save_file

    from .lora import kohya_hashes

    g = torch.Generator().manual_seed(seed)
    targets = [("lora_unet__", k) for k, v in dit_sd.items()
               if v.ndim == 2 and k.endswith(".weight") and "attn_temporal" not in k]
    targets += [("lora_te_", k) for k, v in t5_sd.items()
                if (".SelfAttention." in k or ".DenseReluDense." in k) and "relative_attention_bias" not in k]
    tensors = {}
    for prefix, key in targets:
        out_dim, in_dim = (dit_sd if prefix == "lora_unet__" else t5_sd)[key].shape
        name = prefix + key[: -len(".weight")].replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(LORA_RANK, in_dim, generator=g) / in_dim ** 0.5
        tensors[f"{name}.lora_up.weight"] = 0.1 * torch.randn(out_dim, LORA_RANK, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=kohya_hashes(tensors))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
