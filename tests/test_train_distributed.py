"""Training under accelerate (CPU): the in-process Accelerator run equals the plain run, and two processes launched
by `accelerate launch` shard the data, keep their replicas equal, checkpoint, resume exactly and write outputs once."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_modes import REPO_DIR, cli_args, dataset, make_args, release  # noqa: F401 (fixtures)

import easyanimate_model as ea
from easyanimate_model.train.data import BatchPlanner, DataConfig, Sample, SkipLog, epoch_loader
from easyanimate_model.train.loop import LaunchError, Runtime, Trainer

NEEDS_ACCELERATE = "accelerate is not installed (tests/requirements-test.txt installs it)"


def accelerate_or_skip():
    try:
        import accelerate
    except ImportError:
        pytest.skip(NEEDS_ACCELERATE)
    return accelerate


def test_processes_take_disjoint_equal_shares_of_each_epoch():
    samples = [Sample(f"/data/{i}.png", f"caption {i}", "image", f"meta:[{i}]") for i in range(7)]
    planner = BatchPlanner(samples, DataConfig(), batch_size=1, seed=3, skips=SkipLog())
    plan = planner.plan(0)
    shares = [[b for b, _ in epoch_loader(planner, 0, rank=r, world=2).dataset.batches] for r in range(2)]
    # 7 batches: the 7th is dropped so both processes take 3 steps
    assert shares == [[0, 2, 4], [1, 3, 5]] and len(plan) == 7
    resumed = epoch_loader(planner, 0, start_batch=2, rank=1, world=2)
    assert [resumed.dataset.batches[i][0] for i in resumed.sampler] == [5]


def test_launched_processes_refuse_an_explicit_gpu(monkeypatch):
    accelerate_or_skip()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="--device cuda:1: under a multi-process launch"):
        Runtime.from_environment("cuda:1")


def test_in_process_accelerator_gives_the_plain_loss_curve(release, dataset, tmp_path):
    accelerate_or_skip()
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    extra = ["--max_train_steps", "3", "--use_ema", "--gradient_accumulation_steps", "2", "--train_batch_size", "1"]
    plain = Trainer(make_args(release, dataset, tmp_path / "plain", "lora", "images.json", *extra)).run()
    try:
        runtime = Runtime(accelerator=Accelerator(cpu=True))
        assert (runtime.device.type, runtime.rank, runtime.world) == ("cpu", 0, 1)
        accelerated = Trainer(make_args(release, dataset, tmp_path / "acc", "lora", "images.json", *extra),
                              runtime).run()
    finally:
        AcceleratorState._reset_state(True)  # the state is a process-wide singleton
    assert len(plain["losses"]) == 3 and accelerated["losses"] == plain["losses"]
    a, b = (load_file(r["outputs"]["lora"]) for r in (plain, accelerated))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(argv):
    """`accelerate launch` with two CPU processes. `--cpu --num_processes 2` would start ONE process (accelerate runs
    several CPU processes only through mpirun); `--multi_gpu` starts them with torch.distributed.run and
    `--device cpu` makes the trainer form a gloo group on the CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "easyanimate_model.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)}
    out = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def test_two_processes_checkpoint_resume_and_write_once(release, dataset, tmp_path):
    accelerate_or_skip()
    # batch 1 per process: the missing and the corrupt video make whole batches empty on one process, which
    # must still step in lockstep with the other; EMA and validation run on the synced weights
    extra = ["--max_train_steps", "4", "--train_batch_size", "1", "--checkpointing_steps", "2", "--use_ema",
             "--ema_decay", "0.9", "--validation_prompts", "a test", "--validation_steps", "4",
             "--validation_inference_steps", "1", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    first = tmp_path / "first"
    straight = accelerate_launch(cli_args(release, dataset, first, "motion", "videos.json", *extra))
    # only the main process writes and reports; the summary counts the media skipped on either process
    assert straight.stdout.count("training done: 4 steps on 2 process(es)") == 1, straight.stdout
    for reason in ("missing column: 1", "missing file: 1", "unreadable: 1"):
        assert reason in straight.stdout, straight.stdout
    assert "loss=" in straight.stderr and "samples_s=" in straight.stderr
    assert straight.stderr.count("resumed from") == 0
    checkpoint = first / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "rng_state_0.pt", "rng_state_1.pt", "training_state.pt", "transformer", "transformer_ema"]
    assert (first / "sample" / "sample-4-0.gif").is_file() and len(list((first / "sample").iterdir())) == 1

    second = tmp_path / "second"
    resumed = accelerate_launch(cli_args(release, dataset, second, "motion", "videos.json", *extra,
                                         "--resume_from_checkpoint", str(checkpoint)))
    assert resumed.stderr.count("resumed from") == 1  # logged by the main process only
    a, b = (torch.load(d / "checkpoint-4" / "training_state.pt", weights_only=False) for d in (first, second))
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"]
    for name in ("easyanimate_v1_mm.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        x, y = load_file(first / name), load_file(second / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    # the outputs load back as the release files do
    combined = ea.load_transformer(release["pipeline"], motion_module=first / "easyanimate_v1_mm.safetensors")
    full = ea.load_transformer(first / "transformer")
    for k, v in combined.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
