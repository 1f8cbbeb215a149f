"""The tiny release-file writer: exact names, key layouts, dtypes, and that every file loads like the real one."""
import json

import pytest
import torch
from safetensors import safe_open

from easyanimate_model.config import TransformerConfig
from easyanimate_model.tiny import TINY_CONFIG, write_release_files, write_vae

NUM_LAYERS = TINY_CONFIG.num_layers


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release_files(tmp_path_factory.mktemp("models"), vae="tiny", seed=0)


def test_layout_and_names(release):
    models = release["pipeline"].parents[1]
    files = sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file())
    pipe = "diffusers/PixArt-XL-2-512x512/"
    assert files == sorted([
        "easyanimate/easyanimate_portrait.safetensors", "easyanimate/easyanimate_v1_mm.safetensors",
        "loras/easyanimate_portrait_lora.safetensors", pipe + "model_index.json",
        pipe + "scheduler/scheduler_config.json",
        pipe + "text_encoder/config.json", pipe + "text_encoder/model-00001-of-00002.safetensors",
        pipe + "text_encoder/model-00002-of-00002.safetensors", pipe + "text_encoder/model.safetensors.index.json",
        pipe + "tokenizer/added_tokens.json", pipe + "tokenizer/special_tokens_map.json",
        pipe + "tokenizer/spiece.model", pipe + "tokenizer/tokenizer_config.json",
        pipe + "transformer/config.json", pipe + "transformer/diffusion_pytorch_model.safetensors",
        pipe + "vae/config.json", pipe + "vae/diffusion_pytorch_model.safetensors",
    ])
    index = json.loads((release["pipeline"] / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["transformer"] == ["diffusers", "Transformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]


def test_transformer_files(release):
    config = json.loads((release["transformer"] / "config.json").read_text())
    assert config["_class_name"] == "Transformer2DModel" and "motion_module_kwargs" not in config
    parsed = TransformerConfig.from_diffusers(config)
    assert (parsed.num_layers, parsed.inner_dim, parsed.caption_channels) == (2, 64, 32)
    base, meta = read(release["transformer"] / "diffusion_pytorch_model.safetensors")
    assert len(base) == 15 + 21 * NUM_LAYERS and not any("temporal" in k for k in base)
    assert "pos_embed.pos_embed" not in base and base["caption_projection.linear_1.weight"].shape == (64, 32)
    assert meta == {"format": "pt"}
    mm, mm_meta = read(release["motion_module"])
    assert mm_meta is None and len(mm) == 28 * NUM_LAYERS and all("temporal" in k for k in mm)
    pe = mm["transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0.attention_blocks.0"
            ".pos_encoder.pe"]
    assert pe.shape == (1, 4096, 64)
    assert mm["transformer_blocks.1.attn_temporal.temporal_transformer.proj_out.weight"].abs().min() > 0
    portrait, _ = read(release["portrait"])
    assert portrait.keys() == base.keys() and all(v.dtype == torch.float32 for v in portrait.values())
    assert not torch.equal(portrait["proj_out.weight"], base["proj_out.weight"])


def test_loads_as_the_release(release):
    from easyanimate_model.loading import load_transformer

    model = load_transformer(release["pipeline"], motion_module=release["motion_module"])
    assert model.config.num_layers == NUM_LAYERS and model.config.motion_module is not None
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, torch.tensor([500]), context, torch.ones(1, 5))
        assert out.shape == (1, 8, 2, 8, 8) and torch.isfinite(out).all()
        two_d = load_transformer(release["pipeline"])  # motion module at its zero-initialised identity
        assert not torch.allclose(out, two_d(x, torch.tensor([500]), context, torch.ones(1, 5)))


def test_text_encoder_and_tokenizer(release):
    from easyanimate_model.text import encode_prompt, load_text_encoder

    assert not (release["tokenizer"] / "tokenizer.json").exists()
    index = json.loads((release["text_encoder"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    tokenizer, encoder = load_text_encoder(release["pipeline"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens(1) == "</s>" and tokenizer.sp_model.get_piece_size() == 240
    assert encoder.config.vocab_size == 32128 and encoder.config.d_model == TINY_CONFIG.caption_channels
    assert len(encoder.encoder.block) == 2
    embeds, mask = encode_prompt(tokenizer, encoder, "a snowy forest")
    assert embeds.shape == (1, 120, 32) and 2 < mask.sum() < 120


def test_lora_file(release):
    from easyanimate_model.lora import t5_lora_modules, transformer_lora_modules

    lora, meta = read(release["lora"])
    assert set(meta) == {"sshs_model_hash", "sshs_legacy_hash"} and len(meta["sshs_model_hash"]) == 64
    unet = {"lora_unet__" + m.replace(".", "_") for m in transformer_lora_modules(NUM_LAYERS)[:10 * NUM_LAYERS + 6]}
    te = {"lora_te_" + m.replace(".", "_") for m in t5_lora_modules(2) if not m.endswith(".wi")}
    assert len(unet) == 26 and len(te) == 14
    names = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in lora}
    assert names == unet | te and len(lora) == 3 * len(names)
    assert all(v.dtype == torch.bfloat16 for v in lora.values())
    down = lora["lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight"]
    up = lora["lora_unet__transformer_blocks_0_ff_net_0_proj.lora_up.weight"]
    assert down.shape == (4, 64) and up.shape == (256, 4)
    assert lora["lora_te_encoder_block_1_layer_1_DenseReluDense_wo.lora_down.weight"].shape == (4, 64)
    assert float(lora["lora_unet__proj_out.alpha"]) == 2.0 and lora["lora_unet__proj_out.alpha"].ndim == 0


def test_deterministic_per_seed(release, tmp_path):
    again = write_release_files(tmp_path / "a", seed=0)
    other = write_release_files(tmp_path / "b", seed=1)
    for key in ("motion_module", "portrait"):
        assert again[key].read_bytes() == release[key].read_bytes()
        assert other[key].read_bytes() != release[key].read_bytes()
    # safetensors writes metadata entries in no fixed order, so the LoRA is compared by content
    (lora, meta), (lora_again, meta_again) = read(release["lora"]), read(again["lora"])
    assert meta == meta_again and lora.keys() == lora_again.keys()
    assert all(torch.equal(lora[k], lora_again[k]) for k in lora)
    assert read(other["lora"])[1] != meta
    weights = "diffusion_pytorch_model.safetensors"
    assert (again["transformer"] / weights).read_bytes() == (release["transformer"] / weights).read_bytes()
    shard = "model-00002-of-00002.safetensors"
    assert (again["text_encoder"] / shard).read_bytes() == (release["text_encoder"] / shard).read_bytes()
    assert (again["tokenizer"] / "spiece.model").read_bytes() == (release["tokenizer"] / "spiece.model").read_bytes()


def test_sd_vae_architecture(tmp_path):
    write_vae(tmp_path, "sd")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config["scaling_factor"] == 0.18215 and config["latent_channels"] == 4
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("decoder.conv_out.weight").get_dtype() == "F16"
        assert len(list(f.keys())) > 200


def test_lora_merges_into_both_models(release):
    from easyanimate_model.loading import load_transformer
    from easyanimate_model.lora import merge_lora
    from easyanimate_model.text import load_text_encoder

    model = load_transformer(release["pipeline"])
    _, encoder = load_text_encoder(release["pipeline"])
    before = model.transformer_blocks[0].attn1.to_q.weight.clone()
    report = merge_lora(release["lora"], 1.0, transformer=model, text_encoder=encoder)
    assert not report.not_applied and len(report.applied) == 26 + 14
    assert not torch.equal(before, model.transformer_blocks[0].attn1.to_q.weight)
