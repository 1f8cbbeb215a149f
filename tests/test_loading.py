"""load_transformer on every release layout (tiny fixture in the exact release key layout), config inference at the
real PixArt-XL-2 size (meta device), and the load errors for wrong files."""
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate_model.config import MotionModuleConfig, TransformerConfig
from easyanimate_model.errors import EasyAnimateLoadError
from easyanimate_model.files import load_state_dict_file
from easyanimate_model.loading import infer_config, load_transformer, read_transformer
from easyanimate_model.transformer import Transformer3DModel

FIXTURE = Path(__file__).parent / "fixtures" / "easyanimate_v1_tiny"
BASE = FIXTURE / "base_dit.safetensors"
MM = FIXTURE / "motion_module.safetensors"


@pytest.fixture(scope="module")
def fixture_json():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def config2d(fixture_json):
    return fixture_json["transformer_2d_config"]


@pytest.fixture(scope="module")
def config3d(fixture_json):
    return {**fixture_json["transformer_2d_config"], **fixture_json["motion_module_kwargs"]}


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "forward_reference.safetensors")


@pytest.fixture(scope="module")
def base_sd():
    return load_file(BASE)


@pytest.fixture(scope="module")
def mm_sd():
    return load_file(MM)


def forward(model, ref):
    with torch.no_grad():
        return model(ref["inputs.latents"].to(model.proj_out.weight.dtype), ref["inputs.timestep"],
                     ref["inputs.encoder_hidden_states"], ref["inputs.encoder_attention_mask"]).float()


def assert_matches(model, ref, name, rel=1e-4):
    out, want = forward(model, ref), ref[f"outputs.{name}"]
    err = (out - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"max error {err} vs max|ref| {want.abs().max().item()}"


def to_original_pixart(sd):
    """diffusers PixArt keys -> the original PixArt checkpoint layout (fused qkv / kv, original names)."""
    renames = {"pos_embed.proj.": "x_embedder.proj.",
               "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
               "adaln_single.linear.": "t_block.1.",
               "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
               "caption_projection.linear_2.": "y_embedder.y_proj.fc2.", "proj_out.": "final_layer.linear.",
               "scale_shift_table": "final_layer.scale_shift_table"}
    out = {}
    for key, value in sd.items():
        for new, old in renames.items():
            if key.startswith(new):
                out[old + key[len(new):]] = value
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in blocks:
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn1.to_{x}.{kind}"] for x in "qkv"])
            out[f"blocks.{i}.cross_attn.kv_linear.{kind}"] = torch.cat([sd[f"{b}attn2.to_{x}.{kind}"] for x in "kv"])
            for new, old in (("attn1.to_out.0", "attn.proj"), ("attn2.to_q", "cross_attn.q_linear"),
                             ("attn2.to_out.0", "cross_attn.proj"), ("ff.net.0.proj", "mlp.fc1"),
                             ("ff.net.2", "mlp.fc2")):
                out[f"blocks.{i}.{old}.{kind}"] = sd[f"{b}{new}.{kind}"]
        out[f"blocks.{i}.scale_shift_table"] = sd[f"{b}scale_shift_table"]
    hidden, caption = sd["caption_projection.linear_1.weight"].shape
    out["y_embedder.y_embedding"] = torch.randn(120, caption)  # null caption: not part of the diffusers model
    out["pos_embed"] = torch.randn(1, 1024, hidden)
    return out


def write_transformer_folder(folder: Path, config: dict, sd: dict):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(sd, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# Release layouts


def test_single_files_with_motion_module_match_reference(reference, config3d):
    model = load_transformer(BASE, motion_module=MM, config=config3d)
    assert model.config.motion_module == MotionModuleConfig()
    assert_matches(model, reference, "full")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_2d_file_alone_gives_2d_model(reference, config2d):
    model = load_transformer(BASE, config=config2d)
    assert model.config.motion_module is None
    assert_matches(model, reference, "base2d_per_frame")


def test_2d_file_with_3d_config_gets_identity_motion_module(reference, config3d, caplog):
    cfg = TransformerConfig.from_diffusers(config3d)
    with caplog.at_level(logging.WARNING, logger="easyanimate_model.loading"):
        model = load_transformer(BASE, config=cfg)
    assert "untrained" in caplog.text
    assert model.config.motion_module is not None
    proj_out = model.transformer_blocks[1].attn_temporal.temporal_transformer.proj_out
    assert proj_out.weight.abs().max() == 0 and proj_out.bias.abs().max() == 0
    # an untrained motion module is the identity: the 3D model equals the 2D model frame by frame
    assert_matches(model, reference, "base2d_per_frame")


def test_full_3d_single_file_and_state_dict_wrapper(tmp_path, reference, config2d, config3d, base_sd, mm_sd):
    full = tmp_path / "full.safetensors"
    save_file({**base_sd, **mm_sd}, full)
    assert_matches(load_transformer(full, config=config3d), reference, "full")
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {**base_sd, **mm_sd}, "epoch": 3}, wrapped)
    assert_matches(load_transformer(wrapped, config=config3d), reference, "full")
    # a 2D diffusers config dict with 3D weights: the motion module comes from the keys
    cfg, _ = read_transformer(full, config=config2d)
    assert cfg.motion_module == MotionModuleConfig()


def test_motion_module_without_pe_buffers_is_recomputed(tmp_path, reference, config2d, mm_sd):
    no_pe = tmp_path / "mm_no_pe.safetensors"
    save_file({k: v for k, v in mm_sd.items() if not k.endswith("pos_encoder.pe")}, no_pe)
    model = load_transformer(BASE, motion_module=no_pe, config=config2d)
    assert_matches(model, reference, "full")
    pe = model.transformer_blocks[0].attn_temporal.temporal_transformer.transformer_blocks[0].attention_blocks[0]
    stored = mm_sd["transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0.attention_blocks.0"
                   ".pos_encoder.pe"]
    # fp32 angles p * w lose up to half an ulp of p (2.4e-4 near p = 4096), and libm / SIMD sin implementations
    # round those differently: tight over the trained 80 positions, within that bound over the whole table
    assert torch.allclose(pe.pos_encoder.pe[:, :80], stored[:, :80], atol=1e-5)
    assert torch.allclose(pe.pos_encoder.pe, stored, atol=5e-4)


def test_full_checkpoint_as_motion_module_uses_only_motion_keys(tmp_path, reference, config2d, base_sd, mm_sd,
                                                                caplog):
    full = tmp_path / "full.safetensors"
    damaged_2d = {k: torch.zeros_like(v) for k, v in base_sd.items()}  # must be ignored
    save_file({**damaged_2d, **mm_sd}, full)
    with caplog.at_level(logging.WARNING, logger="easyanimate_model.loading"):
        model = load_transformer(BASE, motion_module=full, config=config2d)
    assert "full checkpoint" in caplog.text
    assert_matches(model, reference, "full")


def test_diffusers_transformer_and_pipeline_folders(tmp_path, reference, config2d, base_sd):
    write_transformer_folder(tmp_path / "transformer_only", config2d, base_sd)
    assert_matches(load_transformer(tmp_path / "transformer_only", motion_module=MM), reference, "full")

    pipe = tmp_path / "PixArt-XL-2-512x512"
    write_transformer_folder(pipe / "transformer", config2d, base_sd)
    for sub in ("text_encoder", "tokenizer", "vae", "scheduler"):
        (pipe / sub).mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    model = load_transformer(pipe)
    assert model.config.motion_module is None and model.config.num_layers == 2
    assert_matches(model, reference, "base2d_per_frame")


def test_config_given_as_path_of_a_folder_or_config_json(tmp_path, reference, config2d, base_sd):
    # a single-file checkpoint (like the portrait one) loaded with the PixArt folder's own config
    pipe = tmp_path / "PixArt-XL-2-512x512"
    write_transformer_folder(pipe / "transformer", config2d, base_sd)
    for config in (pipe, pipe / "transformer", pipe / "transformer" / "config.json"):
        assert_matches(load_transformer(BASE, motion_module=MM, config=config), reference, "full")
    with pytest.raises(EasyAnimateLoadError, match="expected a config.json.*not found"):
        load_transformer(BASE, config=tmp_path / "nowhere")


def test_sharded_and_bin_transformer_folders(tmp_path, reference, config2d, base_sd):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config2d))
    keys = sorted(base_sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:20],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[20:]}
    for name, part in shards.items():
        save_file({k: base_sd[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_matches(load_transformer(sharded, motion_module=MM), reference, "full")

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps(config2d))
    torch.save(base_sd, binary / "diffusion_pytorch_model.bin")
    assert_matches(load_transformer(binary, motion_module=MM), reference, "full")


def test_original_pixart_keys_are_converted(tmp_path, reference, config2d, base_sd):
    original = tmp_path / "PixArt-XL-2-512x512.pth"
    torch.save({"state_dict": to_original_pixart(base_sd)}, original)
    model = load_transformer(original, motion_module=MM, config=config2d)
    assert_matches(model, reference, "full")


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_and_dtype_cast(tmp_path, reference, config2d, base_sd, mm_sd, file_dtype):
    base = tmp_path / "base.safetensors"
    mm = tmp_path / "mm.safetensors"
    save_file({k: v.to(file_dtype) for k, v in base_sd.items()}, base)
    save_file({k: v.to(file_dtype) for k, v in mm_sd.items()}, mm)
    model = load_transformer(base, motion_module=mm, config=config2d, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_matches(model, reference, "full", rel=3e-2)  # the weights themselves were rounded
    half = load_transformer(BASE, motion_module=MM, config=config2d, dtype=file_dtype)
    assert all(t.dtype == file_dtype for t in [*half.parameters(), *half.buffers()] if t.is_floating_point()
               and t is not half.pos_embed.pos_embed)


def test_load_state_dict_file_returns_metadata(tmp_path, base_sd):
    sd, meta = load_state_dict_file(BASE)
    assert meta == {"format": "pt"} and set(sd) == set(base_sd)
    assert torch.equal(sd["proj_out.weight"], base_sd["proj_out.weight"])
    pt = tmp_path / "weights.pt"
    torch.save(base_sd, pt)
    sd, meta = load_state_dict_file(pt)
    assert meta == {} and set(sd) == set(base_sd)


# ---------------------------------------------------------------------------------------------------------------
# Config inference at the real size (meta device: no memory)


@pytest.fixture(scope="module")
def real_shapes():
    model = Transformer3DModel(TransformerConfig(), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_real_size_key_counts_and_inferred_config(real_shapes):
    motion = [k for k in real_shapes if Transformer3DModel.is_motion_key(k)]
    assert (len(real_shapes), len(real_shapes) - len(motion), len(motion)) == (1387, 603, 784)
    assert infer_config(real_shapes) == TransformerConfig()
    assert infer_config({k: s for k, s in real_shapes.items() if k not in motion}) == \
        dataclasses.replace(TransformerConfig(), motion_module=None)


def test_config_needed_for_unknown_hidden_size():
    with pytest.raises(EasyAnimateLoadError, match=r"base_dit.safetensors.*hidden size 64.*config="):
        load_transformer(BASE)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def tiny(shape=(2, 2)):
    return torch.zeros(shape)


FOREIGN = {
    "sd15": ({"model.diffusion_model.input_blocks.0.0.weight": tiny((320, 4, 3, 3)),
              "model.diffusion_model.out.2.weight": tiny(), "first_stage_model.encoder.conv_in.weight": tiny()},
             r"Stable Diffusion 1\.x/2\.x UNet"),
    "sd15_bare": ({"input_blocks.0.0.weight": tiny(), "time_embed.0.weight": tiny()}, r"Stable Diffusion 1\.x"),
    "sdxl": ({"model.diffusion_model.label_emb.0.0.weight": tiny((1280, 2816)),
              "model.diffusion_model.input_blocks.0.0.weight": tiny()}, r"SDXL UNet"),
    "animatediff": ({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": tiny(),
                     "mid_block.motion_modules.0.temporal_transformer.norm.weight": tiny((2,))},
                    r"AnimateDiff motion module"),
    "lora": ({"lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight": tiny(),
              "lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight": tiny()}, r"a LoRA.*merge_lora"),
    "sigma_original": ({"y_embedder.y_embedding": tiny((300, 8)), "x_embedder.proj.weight": tiny((8, 4, 2, 2)),
                        "blocks.0.attn.qkv.weight": tiny((24, 8))}, r"PixArt-Sigma.*300 caption tokens"),
    "pixart_1024": ({"x_embedder.proj.weight": tiny((8, 4, 2, 2)), "blocks.0.attn.qkv.weight": tiny((24, 8)),
                     "csize_embedder.mlp.0.weight": tiny()}, r"micro-conditions"),
    "t5": ({"encoder.block.0.layer.0.SelfAttention.q.weight": tiny(), "shared.weight": tiny()}, r"T5 text encoder"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_checkpoints_are_named(tmp_path, kind):
    sd, message = FOREIGN[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, path)
    with pytest.raises(EasyAnimateLoadError, match=rf"{kind}\.safetensors: expected .*{message}"):
        load_transformer(path)


def test_foreign_checkpoint_given_as_motion_module(tmp_path):
    path = tmp_path / "mm_sd15_v2.ckpt"
    torch.save({"state_dict": FOREIGN["animatediff"][0]}, path)
    with pytest.raises(EasyAnimateLoadError, match=r"mm_sd15_v2\.ckpt: expected an EasyAnimate motion module.*"
                                                   r"AnimateDiff"):
        load_transformer(BASE, motion_module=path)


def test_motion_module_errors(tmp_path, base_sd, mm_sd, config2d):
    with pytest.raises(EasyAnimateLoadError, match=r"motion_module\.safetensors: expected a transformer .*"
                                                   r"only motion-module keys \(56\).*motion_module="):
        load_transformer(MM, config=config2d)
    odd = tmp_path / "odd_mm.safetensors"
    save_file({**mm_sd, "some_other.weight": tiny()}, odd)
    with pytest.raises(EasyAnimateLoadError, match=r"odd_mm\.safetensors: expected a motion module, found 1 keys .*"
                                                   r"some_other\.weight"):
        load_transformer(BASE, motion_module=odd, config=config2d)
    with pytest.raises(EasyAnimateLoadError, match=r"base_dit\.safetensors: expected an EasyAnimate motion module.*"
                                                   r"no motion-module keys"):
        load_transformer(BASE, motion_module=BASE, config=config2d)


def test_missing_unexpected_and_mismatched_keys_are_summarised(tmp_path, base_sd, config2d):
    broken = dict(base_sd)
    for key in sorted(broken)[:7]:
        del broken[key]
    broken["extra.weight"] = tiny()
    broken["proj_out.weight"] = tiny((16, 64))
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    with pytest.raises(EasyAnimateLoadError) as info:
        load_transformer(path, config=config2d)
    message = str(info.value)
    assert "broken.safetensors" in message
    assert "proj_out.weight: file [16, 64], model [32, 64]" in message
    assert "7 missing keys: adaln_single.emb.timestep_embedder.linear_1.bias" in message and "(2 more)" in message
    assert "1 unexpected keys: extra.weight" in message


def test_explicit_2d_config_rejects_motion_weights(config2d):
    with pytest.raises(EasyAnimateLoadError, match=r"56 unexpected keys: transformer_blocks\.0\.attn_temporal"):
        load_transformer(BASE, motion_module=MM, config=TransformerConfig.from_diffusers(config2d))


def test_pixart_sigma_and_1024_configs(tmp_path, config2d, base_sd):
    for name, change, message in (("sigma1024", {"sample_size": 128}, r"expected sample_size 64.*found 128"),
                                  ("alpha1024", {"use_additional_conditions": True},
                                   r"expected .*found use_additional_conditions=true"),
                                  ("sigma512", {"interpolation_scale": 2}, r"expected interpolation_scale 1.*found 2")):
        folder = tmp_path / name
        write_transformer_folder(folder, {**config2d, **change}, {"proj_out.weight": tiny()})
        with pytest.raises(EasyAnimateLoadError, match=rf"{name}[/\\]config\.json: {message}"):
            load_transformer(folder)
    pipe = tmp_path / "PixArt-Sigma-XL-2-512-MS"
    write_transformer_folder(pipe / "transformer", config2d, base_sd)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(EasyAnimateLoadError, match=r"PixArt-Sigma-XL-2-512-MS: expected a PixArt-alpha.*"
                                                   r"PixArtSigmaPipeline"):
        load_transformer(pipe)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EasyAnimateLoadError, match=r"empty: expected a diffusers transformer folder .*empty folder"):
        load_transformer(tmp_path / "empty")
    sd_pipe = tmp_path / "sd15"
    (sd_pipe / "unet").mkdir(parents=True)
    (sd_pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(EasyAnimateLoadError, match=r"found a StableDiffusionPipeline without one"):
        load_transformer(sd_pipe)
    with pytest.raises(EasyAnimateLoadError, match=r"nope\.safetensors: expected a transformer file .*found nothing"):
        load_transformer(tmp_path / "nope.safetensors")


def test_broken_files(tmp_path, base_sd):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(BASE.read_bytes()[:100_000])
    with pytest.raises(EasyAnimateLoadError, match=r"truncated\.safetensors: truncated safetensors file: the tensors "
                                                   r"need \d+ bytes, the file has 100000"):
        load_transformer(truncated)
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(BASE.read_bytes()[:200])
    with pytest.raises(EasyAnimateLoadError,
                       match=r"cut_header\.safetensors: truncated .*header says \d+ header bytes"):
        load_transformer(cut_header)

    cases = {
        "garbage.safetensors": (bytes(range(256)) * 40, r"a safetensors file, found unrecognised content"),
        "page.safetensors": (b"<!DOCTYPE html><html>Not found</html>", r"found an HTML/XML page"),
        "lfs.safetensors": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", r"Git LFS pointer"),
        "notes.ckpt": (b"hello, these are not weights", r"a \.safetensors file or a PyTorch checkpoint, found "
                                                       r"unrecognised"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EasyAnimateLoadError, match=rf"{name}: expected .*{message}"):
            load_state_dict_file(tmp_path / name)

    renamed = tmp_path / "renamed.safetensors"
    torch.save(base_sd, renamed)
    with pytest.raises(EasyAnimateLoadError, match=r"renamed\.safetensors: expected a safetensors file, found a "
                                                   r"PyTorch zip checkpoint"):
        load_state_dict_file(renamed)


class NotATensor:
    pass


def test_pickles_only_with_weights_only(tmp_path):
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"proj_out.weight": tiny()}, "trainer": NotATensor()}, evil)
    with pytest.raises(EasyAnimateLoadError, match=r"model\.ckpt: this pickle checkpoint holds Python objects other "
                                                   r"than tensors.*weights_only=True"):
        load_state_dict_file(evil)
    cut = tmp_path / "cut.pt"
    torch.save({"a": torch.zeros(1000)}, tmp_path / "whole.pt")
    cut.write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    with pytest.raises(EasyAnimateLoadError, match=r"cut\.pt: expected a PyTorch checkpoint .*could not read it"):
        load_state_dict_file(cut)
    no_tensors = tmp_path / "hparams.pt"
    torch.save({"lr": 1e-4, "steps": 10}, no_tensors)
    with pytest.raises(EasyAnimateLoadError, match=r"hparams\.pt: expected a state dict .*found a dict without "
                                                   r"tensors \(keys: lr, steps\)"):
        load_state_dict_file(no_tensors)
