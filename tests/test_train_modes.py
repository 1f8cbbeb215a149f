"""Training end to end on the tiny release set (CPU): every mode learns, outputs load back, resume is exact."""
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import easyanimate_model as ea
from easyanimate_model.lora import t5_lora_modules, transformer_lora_modules
from easyanimate_model.tiny import TINY_CONFIG, write_release_files
from easyanimate_model.train.cli import parse_args
from easyanimate_model.train.data import DatasetError
from easyanimate_model.train.loop import LaunchError, Trainer

REPO_DIR = Path(__file__).resolve().parents[1]

iio = pytest.importorskip("imageio.v3")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release_files(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(3):
        # smooth clips (a moving gradient) so a few steps of training visibly lower the loss
        x = np.linspace(0, 1, 64)
        frames = np.stack([np.stack([np.outer(x, x) * 255 * (1 - i * 0.3), np.roll(np.outer(x, 1 - x), f * 4, 1) * 255,
                                     np.full((64, 64), 40 + 80 * i)], -1) for f in range(12)]).astype(np.uint8)
        if i < 2:
            iio.imwrite(root / f"v{i}.mp4", frames, plugin="pyav", codec="libx264", fps=8)
            rows.append({"file_path": f"v{i}.mp4", "text": f"a moving gradient {i}", "type": "video"})
        iio.imwrite(root / f"i{i}.png", frames[3 * i])
        rows.append({"file_path": f"i{i}.png", "text": f"a still gradient {i}", "type": "image"})
    (root / "corrupt.mp4").write_bytes(b"\x00not a video" * 64)
    bad = [{"file_path": "missing.mp4", "text": "gone", "type": "video"},
           {"file_path": "corrupt.mp4", "text": "broken", "type": "video"},
           {"text": "no path", "type": "video"}]
    (root / "videos.json").write_text(json.dumps([r for r in rows if r["type"] == "video"] + bad))
    (root / "images.json").write_text(json.dumps([r for r in rows if r["type"] == "image"]))
    return root


def make_args(release, dataset, out, mode, meta, *extra):
    return parse_args(cli_args(release, dataset, out, mode, meta, *extra))


def cli_args(release, dataset, out, mode, meta, *extra):
    """The command line of a tiny run on CPU (fp32, constant lr, rank-4 LoRA)."""
    return [
        "--mode", mode, "--pretrained_model_name_or_path", str(release["pipeline"]),
        "--train_data_dir", str(dataset), "--train_data_meta", str(dataset / meta), "--output_dir", str(out),
        "--sample_size", "32", "--sample_n_frames", "4", "--sample_stride", "2", "--train_batch_size", "2",
        "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no",
        "--checkpointing_steps", "100", "--rank", "4", "--network_alpha", "4", "--seed", "0", "--device", "cpu",
        *extra]


def fixed_loss(trainer, draws=6):
    """Loss of the first batch at fixed noise/timesteps (independent of the training RNG stream)."""
    from easyanimate_model.train.data import epoch_loader

    batch = next(iter(epoch_loader(trainer.planner, 0)))
    saved = trainer.generator.get_state()
    trainer.generator.manual_seed(1234)
    with torch.no_grad():
        loss = sum(float(trainer.forward_loss(batch)) for _ in range(draws)) / draws
    trainer.generator.set_state(saved)
    return loss


def train_and_measure(args):
    trainer = Trainer(args)
    before = fixed_loss(trainer)
    result = trainer.run()
    return trainer, result, before, fixed_loss(trainer)


def no_warnings(caplog, fn, *a, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(*a, **kw)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    return out


def test_help_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('easyanimate_model.train', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = {'torch', 'accelerate', 'diffusers', 'transformers'} & set(sys.modules)\n"
            "assert not heavy, f'--help imported {heavy}'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_DIR)
    assert out.returncode == 0, out.stderr
    assert "--pretrained_model_name_or_path" in out.stdout and "--mode" in out.stdout


def test_bad_arguments_fail_before_loading(release, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_args(release, dataset, tmp_path, "motion", "videos.json", "--sample_size", "48")
    assert "multiple of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--train_data_dir", str(dataset)])
    assert "not found" in capsys.readouterr().err
    args = make_args(release, dataset, tmp_path, "t2i", "images.json")
    args.train_data_meta = str(dataset / "absent.json")
    with pytest.raises(DatasetError, match="absent.json"):
        Trainer(args)
    args = make_args(release, dataset, tmp_path, "t2i", "images.json", "--train_batch_size", "4")
    with pytest.raises(DatasetError, match="no full batch of 4"):
        Trainer(args)


def test_motion_module_training(release, dataset, tmp_path, caplog):
    args = make_args(release, dataset, tmp_path, "motion", "videos.json", "--max_train_steps", "8",
                     "--random_frame_crop", "--gradient_checkpointing", "--validation_prompts", "a test",
                     "--validation_steps", "8", "--validation_inference_steps", "2")
    trainer, result, before, after = train_and_measure(args)
    assert after < 0.8 * before, (before, after, result["losses"])
    # only the motion module trained
    assert trainer.models.trainable and all("attn_temporal" in n for n in trainer.models.trainable)
    # bad rows were skipped and counted: missing column (at read), missing file, unreadable (at load)
    assert result["skipped"] == 3 and "missing column: 1" in result["skip_summary"]
    assert "missing file: 1" in result["skip_summary"] and "unreadable: 1" in result["skip_summary"]
    preview = iio.imread(tmp_path / "sample" / "sample-8-0.gif", index=None)
    assert preview.shape[:3] == (4, 32, 32)

    out = result["outputs"]
    with safe_open(out["motion_module"], "pt") as f:
        assert f.metadata() is None
        keys = set(f.keys())
    model_sd = trainer.models.transformer.state_dict()
    assert keys == {k for k in model_sd if "temporal" in k}
    with safe_open(f"{out['transformer']}/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(model_sd)
    full = no_warnings(caplog, ea.load_transformer, out["transformer"])
    assert full.config.motion_module is not None
    combined = no_warnings(caplog, ea.load_transformer, release["pipeline"], motion_module=out["motion_module"])
    for k, v in combined.state_dict().items():
        assert torch.equal(v, model_sd[k]), k


def test_t2i_training(release, dataset, tmp_path, caplog):
    args = make_args(release, dataset, tmp_path, "t2i", "images.json", "--max_train_steps", "8", "--use_ema",
                     "--ema_decay", "0.5")
    trainer, result, before, after = train_and_measure(args)
    assert after < 0.8 * before, (before, after, result["losses"])
    model = trainer.models.transformer
    assert model.config.motion_module is None and len(trainer.models.trainable) == len(list(model.parameters()))
    ckpt = result["outputs"]["checkpoint_2d"]
    with safe_open(ckpt, "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    # a single tiny file needs its config (only the real PixArt-XL size is inferred from shapes)
    loaded = no_warnings(caplog, ea.load_transformer, ckpt, config=model.config)
    assert loaded.config.motion_module is None
    # the final weights are the EMA weights
    for name, p in model.named_parameters():
        assert torch.equal(loaded.state_dict()[name], trainer.ema.shadow[name]), name
    no_warnings(caplog, ea.load_transformer, result["outputs"]["transformer"])
    # like the portrait checkpoint: the 2D file under a motion module gives the video model with both
    video = no_warnings(caplog, ea.load_transformer, ckpt, motion_module=release["motion_module"], config=TINY_CONFIG)
    motion = load_file(release["motion_module"])
    for k, v in video.state_dict().items():
        assert torch.equal(v, motion[k] if "temporal" in k else loaded.state_dict()[k]), k


def test_lora_training_with_text_encoder(release, dataset, tmp_path, caplog):
    args = make_args(release, dataset, tmp_path, "lora", "images.json", "--max_train_steps", "8",
                     "--train_text_encoder", "--learning_rate", "5e-3")
    trainer, result, before, after = train_and_measure(args)
    assert after < 0.9 * before, (before, after, result["losses"])
    path = result["outputs"]["lora"]
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert set(meta) == {"sshs_model_hash", "sshs_legacy_hash"} and len(meta["sshs_legacy_hash"]) == 8
    layers = trainer.models.transformer.config.num_layers
    dit = {"lora_unet__" + p.replace(".", "_") for p in transformer_lora_modules(layers)[:10 * layers + 6]}
    te_modules = [p for p in t5_lora_modules(2) if not p.endswith(".wi")]
    te = {"lora_te_" + p.replace(".", "_") for p in te_modules}
    assert keys == {f"{n}.{s}" for n in dit | te for s in ("lora_down.weight", "lora_up.weight", "alpha")}

    model = ea.load_transformer(release["pipeline"])
    _, encoder = ea.load_text_encoder(release["pipeline"])
    before_w = model.transformer_blocks[0].attn1.to_q.weight.clone()
    report = no_warnings(caplog, ea.merge_lora, path, 1.0, transformer=model, text_encoder=encoder)
    assert len(report.applied) == len(dit) + len(te) and not report.not_applied
    # merged weight = W + (alpha / r) * up @ down
    lora = trainer.models.network.loras["lora_unet__transformer_blocks_0_attn1_to_q"]
    delta = lora.lora_up.weight @ lora.lora_down.weight
    assert torch.allclose(model.transformer_blocks[0].attn1.to_q.weight, before_w + delta, atol=1e-6)


def test_video_lora_excludes_the_motion_module(release, dataset, tmp_path, caplog):
    args = make_args(release, dataset, tmp_path, "video_lora", "videos.json", "--max_train_steps", "2",
                     "--motion_module_path", str(release["motion_module"]), "--mixed_precision", "bf16")
    trainer, result, _, _ = train_and_measure(args)
    names = list(trainer.models.network.loras)
    assert names and not any("temporal" in n for n in names)
    with safe_open(result["outputs"]["lora"], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = ea.load_transformer(release["pipeline"], motion_module=release["motion_module"])
    report = no_warnings(caplog, ea.merge_lora, result["outputs"]["lora"], 1.0, transformer=model)
    assert len(report.applied) == len(names) and not report.not_applied


def test_resume_continues_the_same_loss_curve(release, dataset, tmp_path):
    extra = ["--max_train_steps", "6", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--use_ema", "--checkpointing_steps", "2",
             "--enable_bucket"]
    straight = Trainer(make_args(release, dataset, tmp_path / "a", "lora", "images.json", *extra)).run()
    # the interrupted/resumed run caches VAE/T5 outputs: the curve must not change
    extra_b = [*extra, "--cache_dir", str(tmp_path / "cache")]
    interrupted = Trainer(make_args(release, dataset, tmp_path / "b", "lora", "images.json", *extra_b))
    interrupted.total_steps = 3  # stop one step after checkpoint-2 (mid-epoch), as a killed run would
    interrupted.run()
    resumed = Trainer(make_args(release, dataset, tmp_path / "b", "lora", "images.json", *extra_b,
                                "--resume_from_checkpoint", "latest"))
    result = resumed.run()
    assert len(straight["losses"]) == 6 and result["global_step"] == 6
    assert result["losses"] == straight["losses"]
    assert list((tmp_path / "cache" / "latents").iterdir()) and list((tmp_path / "cache" / "text").iterdir())
    a, b = (safe_open(p, "pt") for p in (straight["outputs"]["lora"], result["outputs"]["lora"]))
    for k in a.keys():
        assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k

    # a checkpoint holds one RNG stream and data position per process: another process count is refused
    state_file = tmp_path / "b" / "checkpoint-6" / "training_state.pt"
    state = torch.load(state_file, weights_only=False)
    torch.save({**state, "processes": 2}, state_file)
    with pytest.raises(LaunchError, match="2 process.*this run has 1; resume with the same number"):
        Trainer(make_args(release, dataset, tmp_path / "b", "lora", "images.json", *extra_b,
                          "--resume_from_checkpoint", "latest")).run()


def test_low_learning_rate_group_steps_a_tenth(release, dataset, tmp_path):
    # Adam's first step moves every weight with a clear gradient by about its learning rate (g / |g|)
    args = make_args(release, dataset, tmp_path, "t2i", "images.json", "--max_train_steps", "1",
                     "--trainable_modules_low_learning_rate", "caption_projection", "--adam_weight_decay", "0")
    trainer = Trainer(args)
    before = {n: p.detach().clone() for n, p in trainer.models.trainable.items()}
    trainer.run()
    lr = args.learning_rate
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr, lr / 10]
    low = {n for n in before if "caption_projection" in n}
    assert {id(p) for p in trainer.optimizer.param_groups[1]["params"]} == {id(trainer.models.trainable[n])
                                                                          for n in low}
    for names, expected in ((set(before) - low, lr), (low, lr / 10)):
        step = max(float((trainer.models.trainable[n].detach() - before[n]).abs().max()) for n in names)
        assert step == pytest.approx(expected, rel=1e-3), (expected, step)


def cpu_fp16_autocast_works():
    with torch.autocast("cpu", dtype=torch.float16):
        return torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16


def test_fp16_mixed_precision_with_loss_scaling(release, dataset, tmp_path):
    if not cpu_fp16_autocast_works():
        pytest.skip(f"torch {torch.__version__} has no float16 autocast on CPU")
    args = make_args(release, dataset, tmp_path, "lora", "images.json", "--max_train_steps", "2",
                     "--mixed_precision", "fp16")
    trainer, result, before, after = train_and_measure(args)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1
    assert all(np.isfinite(result["losses"])) and after < before, (before, after)
    assert all(p.dtype == torch.float32 for p in trainer.models.trainable.values())  # fp32 master weights
    with safe_open(result["outputs"]["lora"], "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
