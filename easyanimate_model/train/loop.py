"""The training loop: models per mode, AdamW + schedules, accumulation, clipping, mixed precision, EMA, checkpoints,
exact resume and validation samples (docs/MODEL.md §D).

Exact resume: a checkpoint holds the trainable weights in fp32, optimizer / scheduler / scaler / EMA state, every
RNG state of every process (python, numpy, torch, CUDA and the training generator that draws noise, timesteps and VAE
samples) and the data position (epoch, batches consumed). Batches and their augmentations depend only on (seed,
epoch, batch index) (data.py), so a resumed run continues the uninterrupted loss curve exactly.

Several processes (`accelerate launch`, see Runtime): process r of W takes batches r, r+W, ... of each epoch and
draws noise from seed + r; gradients are summed before each step, so the replicas stay equal; only the main process
logs progress, validates and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import shutil
import time

import numpy as np
import torch

from ..config import IMAGE_SIZE_MULTIPLE, SIZE_MULTIPLE
from ..vae import latent_distribution, sample_latents
from . import export
from .data import BatchPlanner, DataConfig, DatasetError, SkipLog, epoch_loader, read_metadata
from .diffusion import GaussianDiffusion
from .lora_network import LoRANetwork

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
RNG_FILE = "rng_state_{rank}.pt"  # one per process
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------- runtime

class LaunchError(RuntimeError):
    """The process setup cannot train correctly (e.g. several processes without a process group)."""


def launched_world_size() -> int:
    """Processes started by torchrun / `accelerate launch --multi_gpu` (WORLD_SIZE) or mpirun (PMI/OMPI sizes)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


class Runtime:
    """The process this trainer runs in: device, rank, world size, and the collectives that keep replicas equal.

    Several processes each train a full replica on their own share of the batches; gradients are summed across
    processes before every optimizer step (in float32 buckets, like DDP's all-reduce but after backward), so all
    replicas take the same step. `accelerate` only sets up the process group and the device.
    """

    BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most this many elements

    def __init__(self, device: str | torch.device | None = None, accelerator=None):
        self.accelerator = accelerator
        if accelerator is not None:
            self.device = accelerator.device
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.rank, self.world = 0, 1

    @classmethod
    def from_environment(cls, device: str | None) -> "Runtime":
        """accelerate when installed (always when several processes were launched), else one plain process.

        `--device cpu` under a launcher trains on CPU with the gloo backend; other explicit devices are only for a
        single process (accelerate picks one GPU per process).
        """
        world = launched_world_size()
        try:
            from accelerate import Accelerator
        except ImportError:
            if world > 1:
                raise LaunchError(f"{world} processes were launched (WORLD_SIZE={world}) but accelerate is not "
                                  "installed: install accelerate, or run one process") from None
            return cls(device)
        if world == 1 and device is not None:
            return cls(device)
        if device not in (None, "cpu"):
            raise LaunchError(f"--device {device}: under a multi-process launch each process gets its device from "
                              "accelerate; leave --device out (or use --device cpu)")
        if world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
            # `accelerate launch --cpu --num_processes N` without --mpirun_hostfile starts a single process
            logger.warning("accelerate launch --cpu started one process: several CPU processes need mpirun "
                           "(--mpirun_hostfile) or `accelerate launch --multi_gpu --num_processes N ... --device cpu`")
        # without CUDA accelerate only forms a process group when told to use the CPU
        cpu = device == "cpu" or not torch.cuda.is_available()
        accelerator = Accelerator(cpu=cpu, mixed_precision="no")  # autocast and loss scaling are done here
        if accelerator.num_processes != world:
            raise LaunchError(f"{world} processes were launched but accelerate formed a group of "
                              f"{accelerator.num_processes} ({accelerator.distributed_type}); every process would "
                              "train alone and overwrite the others' files")
        return cls(accelerator=accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist

        return dist

    def barrier(self):
        if self.world > 1:
            self._dist().barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes."""
        if self.world > 1:
            self._dist().all_reduce(tensor)
        return tensor

    def broadcast_(self, tensors):
        """Rank 0's values into every process (replicas start equal whatever their initialisation)."""
        if self.world > 1:
            for t in tensors:
                self._dist().broadcast(t.data, src=0)

    def sum_gradients_(self, params):
        """In-place sum of the gradients over processes; a missing gradient counts as zeros."""
        if self.world == 1:
            return
        bucket, size = [], 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= self.BUCKET_ELEMENTS:
                self._sum_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads):
        flat = self.sum_(torch.cat([g.reshape(-1).float() for g in grads]))
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))

    def check_replicas(self, tensors):
        """Raise if the processes' copies differ (a lost gradient sync would otherwise go unnoticed)."""
        if self.world == 1:
            return
        dist = self._dist()
        local = torch.stack([t.detach().double().sum() for t in tensors])
        high, low = local.clone(), local.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        differ = ~torch.isclose(high, low, rtol=0, atol=0, equal_nan=True)
        if differ.any():
            raise RuntimeError(f"the {self.world} processes hold different trainable weights "
                               f"({int(differ.sum())} of {len(local)} tensors differ): replicas diverged")

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._dist().all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of the trainable parameters, diffusers EMAModel warm-up:
    decay = min(max_decay, (1 + s) / (10 + s)) with s = updates - 1, and 0 at the first update."""

    def __init__(self, params: dict[str, torch.nn.Parameter], max_decay: float = 0.9999):
        self.max_decay = max_decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def decay(self) -> float:
        step = self.updates - 1
        return 0.0 if step <= 0 else min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]):
        self.updates += 1
        keep = self.decay()
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - keep)

    @contextlib.contextmanager
    def applied(self, params: dict[str, torch.nn.Parameter]):
        """Temporarily put the EMA weights into the model (validation, saving)."""
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self):
        return {"updates": self.updates, "max_decay": self.max_decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.updates, self.max_decay = state["updates"], state["max_decay"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


# -------------------------------------------------------------------------------------------------------- models

@dataclasses.dataclass
class Models:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module
    network: LoRANetwork | None
    trainable: dict[str, torch.nn.Parameter]  # name -> parameter (LoRA names for LoRA modes)
    param_groups: list[dict]


def build_transformer(args):
    """The transformer to train, loaded by the library's loader (docs/MODEL.md §A.6): the pretrained folder's config
    (with the motion module for the video modes), its weights or `--transformer_path`'s, and the motion module of
    `--motion_module_path` (or of a motion-module-only `--transformer_path`, the video LoRA recipe). Original PixArt
    keys are converted, and every key and shape is checked: a 3D checkpoint given to --mode t2i is an error naming
    its attn_temporal keys, not a silent partial load."""
    from ..config import MotionModuleConfig, TransformerConfig
    from ..errors import EasyAnimateLoadError
    from ..files import open_weights
    from ..loading import load_transformer, read_config
    from ..transformer import Transformer3DModel

    folder = args.pretrained_model_name_or_path
    try:
        cfg = TransformerConfig.from_diffusers(read_config(folder))
    except ValueError as e:
        raise EasyAnimateLoadError(f"--pretrained_model_name_or_path {folder}: {e}") from None
    cfg = dataclasses.replace(cfg, motion_module=(cfg.motion_module or MotionModuleConfig()) if args.video else None)
    base, motion = folder, args.motion_module_path
    if args.transformer_path:
        keys = open_weights(args.transformer_path).keys()
        if keys and all(Transformer3DModel.is_motion_key(k) for k in keys):
            if motion is not None:
                raise EasyAnimateLoadError(f"--transformer_path {args.transformer_path}: a motion module, and "
                                           f"--motion_module_path gives another one: give only one")
            motion = args.transformer_path
        else:
            base = args.transformer_path
    model = load_transformer(base, motion_module=motion, config=cfg)
    logger.info("transformer from %s%s", base, f" + motion module {motion}" if motion else "")
    return model


def build_models(args, device) -> Models:
    from ..text import load_text_encoder
    from ..vae import load_vae

    weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
    transformer = build_transformer(args).to(device).requires_grad_(False)
    transformer.gradient_checkpointing = args.gradient_checkpointing
    vae = load_vae(args.pretrained_model_name_or_path, dtype=weight_dtype).to(device).requires_grad_(False).eval()
    tokenizer, text_encoder = load_text_encoder(args.pretrained_model_name_or_path, dtype=weight_dtype, device=device)
    text_encoder.requires_grad_(False).eval()

    network = None
    if args.mode in ("lora", "video_lora"):
        network = LoRANetwork(transformer, args.rank, args.network_alpha,
                              text_encoder=text_encoder if args.train_text_encoder else None).to(device)
        trainable = dict(network.named_parameters())
        groups = network.parameter_groups(args.learning_rate, args.text_encoder_lr)
    else:
        trainable, low = {}, []
        for name, p in transformer.named_parameters():
            if any(s in name for s in args.trainable_modules_low_learning_rate):
                low.append(p)
            elif not any(s in name for s in args.trainable_modules):
                continue
            trainable[name] = p
        if not trainable:
            raise DatasetError(f"--trainable_modules {args.trainable_modules}: no transformer parameter matches")
        low_ids = {id(p) for p in low}
        groups = [{"params": [p for p in trainable.values() if id(p) not in low_ids], "lr": args.learning_rate},
                  {"params": low, "lr": args.learning_rate / 10}]
        groups = [g for g in groups if g["params"]]
    for p in trainable.values():
        p.requires_grad_(True)
    transformer.train()
    if args.train_text_encoder:
        text_encoder.train()
    return Models(transformer, vae, tokenizer, text_encoder, network, trainable, groups)


# ----------------------------------------------------------------------------------------------- frozen encoders

class FrozenEncoders:
    """VAE latents and T5 embeddings, optionally cached on disk (`--cache_dir`).

    The VAE cache stores the latent distribution (mean, std) per preprocessed clip (keyed by its pixel bytes); the
    sample mean + std * noise is always drawn fresh from the training generator, so caching changes no number.
    """

    def __init__(self, models: Models, args, device, generator):
        self.m, self.args, self.device, self.generator = models, args, device, generator
        self.cache_dir = args.cache_dir
        if self.cache_dir:
            os.makedirs(os.path.join(self.cache_dir, "latents"), exist_ok=True)
            os.makedirs(os.path.join(self.cache_dir, "text"), exist_ok=True)

    def _cached(self, kind: str, key: bytes, compute):
        if not self.cache_dir:
            return compute()
        from safetensors.torch import load_file, save_file

        path = os.path.join(self.cache_dir, kind, hashlib.sha1(key).hexdigest() + ".safetensors")
        if os.path.isfile(path):
            return load_file(path, device=str(self.device))
        value = compute()
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, tmp)
        os.replace(tmp, path)
        return value

    def _latent_dist(self, clip: torch.Tensor) -> dict:
        """[F, 3, H, W] in [-1, 1] -> {"mean", "std"} [F, 4, h, w] (float32), encoded in --vae_mini_batch chunks."""
        mean, std = latent_distribution(self.m.vae, clip, self.args.vae_mini_batch)
        return {"mean": mean, "std": std}

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] -> scaled latents [B, 4, F, h, w] (float32)."""
        out = []
        for clip in pixel_values:
            dist = self._cached("latents", clip.numpy().tobytes() if clip.device.type == "cpu" else
                                clip.cpu().numpy().tobytes(), lambda c=clip: self._latent_dist(c))
            out.append(sample_latents(dist["mean"].to(self.device), dist["std"].to(self.device), self.generator))
        return torch.stack(out).transpose(1, 2)  # [B, F, 4, h, w] -> [B, 4, F, h, w]

    def text(self, captions: list[str], train: bool = False, clean: bool = False):
        from ..text import encode_prompt

        m = self.m
        if train:
            return encode_prompt(m.tokenizer, m.text_encoder, captions, clean=clean)
        results = []
        for caption in captions:
            def compute(c=caption):
                with torch.no_grad():
                    embeds, mask = encode_prompt(m.tokenizer, m.text_encoder, [c], clean=clean)
                return {"embeds": embeds[0], "mask": mask[0]}
            results.append(self._cached("text", f"{clean}:{caption}".encode(), compute))
        return torch.stack([r["embeds"] for r in results]), torch.stack([r["mask"] for r in results])


# --------------------------------------------------------------------------------------------------- checkpoints

def _rng_state(generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(output_dir: str, which: str) -> str | None:
    if which != "latest":
        return which
    if not os.path.isdir(output_dir):
        return None
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
             and os.path.isfile(os.path.join(output_dir, d, STATE_FILE))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


# ------------------------------------------------------------------------------------------------------ training

class Trainer:
    def __init__(self, args, runtime: Runtime | None = None):
        self.args = args
        self.rt = runtime or Runtime(args.device)
        self.skips = SkipLog()
        # the dataset is read and planned before any model is loaded, so bad paths fail fast
        samples = read_metadata(args.train_data_dir, args.train_data_meta, args.train_data_format, self.skips,
                                args.image_column, args.caption_column)
        cfg = DataConfig(sample_size=args.sample_size, n_frames=args.sample_n_frames if args.video else 1,
                         stride=args.sample_stride, enable_bucket=args.enable_bucket,
                         random_ratio_crop=args.random_ratio_crop, random_frame_crop=args.random_frame_crop,
                         flip=not args.no_flip, size_multiple=SIZE_MULTIPLE if args.video else IMAGE_SIZE_MULTIPLE)
        self.planner = BatchPlanner(samples, cfg, args.train_batch_size, args.seed, self.skips)
        batches = len(self.planner.plan(0)) // self.rt.world
        if batches == 0:
            raise DatasetError(f"{len(samples)} usable samples give no full batch of {args.train_batch_size} per "
                               f"process ({self.skips.summary()}; batches hold one media type"
                               f"{' and one bucket' if args.enable_bucket else ''})")
        self.steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        self.total_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch

        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.device = self.rt.device
        self.models = build_models(args, self.device)
        self.rt.broadcast_(self.models.trainable.values())
        self.generator = torch.Generator(self.device).manual_seed(args.seed + self.rt.rank)
        self.encoders = FrozenEncoders(self.models, args, self.device, self.generator)
        self.diffusion = GaussianDiffusion()
        self.optimizer = torch.optim.AdamW(self.models.param_groups, lr=args.learning_rate,
                                           betas=(args.adam_beta1, args.adam_beta2),
                                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        self.autocast_dtype = WEIGHT_DTYPES[args.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.mixed_precision == "fp16")
        self.ema = EMA(self.models.trainable, args.ema_decay) if args.use_ema else None
        self.global_step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.losses: list[float] = []  # one mean loss per optimizer step (tests compare curves)

    # ----------------------------------------------------------------------------------------- one micro-batch
    def forward_loss(self, batch) -> torch.Tensor:
        args, m = self.args, self.models
        latents = self.encoders.latents(batch["pixel_values"])
        embeds, mask = self.encoders.text(batch["text"], train=args.train_text_encoder)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        t = self.diffusion.sample_timesteps(b, self.generator, self.device)
        xt = self.diffusion.q_sample(latents, t, noise)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=args.mixed_precision != "no"):
            out = m.transformer(xt, t, embeds, mask)
        return self.diffusion.training_losses(out, latents, xt, t, noise)["loss"].mean()

    def optimizer_step(self, loss_sum: float, batches: int, samples: int) -> dict | None:
        """One step on the gradients accumulated over the window (`batches` non-empty micro-batches of this
        process, each backpropagated as loss / accumulation steps). Returns the window's totals over all processes,
        or None when no process had data (no step)."""
        totals = self.rt.sum_(torch.tensor([loss_sum, batches, samples], dtype=torch.float64, device=self.device))
        loss_sum, batches, samples = totals.tolist()
        if batches == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        params = list(self.models.trainable.values())
        # summed before unscale_, so every process sees the same inf/nan and the scaler skips the step everywhere
        self.rt.sum_gradients_(params)
        factor = self.args.gradient_accumulation_steps / batches  # 1 without skipped batches on one process
        if factor != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        self.scaler.unscale_(self.optimizer)
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.models.trainable)
        return {"loss": loss_sum / batches, "samples": samples}

    # ------------------------------------------------------------------------------------------- checkpoints
    def merge_skips(self):
        """Every process learns the media the others skipped (checkpoints and the summary count them all)."""
        for items in self.rt.gather_objects(self.skips.state_dict()):
            self.skips.merge(items)

    def save_checkpoint(self):
        args = self.args
        path = os.path.join(args.output_dir, f"checkpoint-{self.global_step}")
        self.merge_skips()
        self.rt.check_replicas(self.models.trainable.values())
        # each process draws its own noise: every one saves its RNG states; the main process writes the rest,
        # STATE_FILE last, so a checkpoint folder with STATE_FILE is complete
        os.makedirs(path, exist_ok=True)
        torch.save(_rng_state(self.generator), os.path.join(path, RNG_FILE.format(rank=self.rt.rank)))
        self.rt.barrier()
        if self.rt.is_main:
            export.save_training_weights(self, path)
            state = {
                "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "skips": self.skips.state_dict(), "losses": self.losses, "mode": args.mode,
                "processes": self.rt.world,
            }
            torch.save(state, os.path.join(path, STATE_FILE))
            self._prune_checkpoints()
            logger.info("saved %s", path)
        self.rt.barrier()
        return path

    def _prune_checkpoints(self):
        limit = self.args.checkpoints_total_limit
        if not limit:
            return
        dirs = sorted((d for d in os.listdir(self.args.output_dir)
                       if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
                       and os.path.isdir(os.path.join(self.args.output_dir, d))), key=lambda d: int(d.split("-")[1]))
        for d in dirs[:-limit]:
            shutil.rmtree(os.path.join(self.args.output_dir, d))
            lora_file = os.path.join(self.args.output_dir, d + ".safetensors")
            if os.path.isfile(lora_file):
                os.remove(lora_file)

    def resume(self, path: str):
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
        if state["mode"] != self.args.mode:
            raise DatasetError(f"--resume_from_checkpoint {path}: saved by --mode {state['mode']}, "
                               f"not {self.args.mode}")
        if state["processes"] != self.rt.world:
            # the data position counts this process's batches and each process has its own RNG stream
            raise LaunchError(f"--resume_from_checkpoint {path}: saved by a run with {state['processes']} "
                              f"process(es), this run has {self.rt.world}; resume with the same number")
        export.load_training_weights(self, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.global_step, self.epoch, self.batch_in_epoch = (state["global_step"], state["epoch"],
                                                             state["batch_in_epoch"])
        self.skips.load_state_dict(state["skips"])
        self.losses = list(state["losses"])
        rng_file = os.path.join(path, RNG_FILE.format(rank=self.rt.rank))
        if not os.path.isfile(rng_file):
            raise LaunchError(f"--resume_from_checkpoint {path}: {os.path.basename(rng_file)} not found; every "
                              "process writes its own, so --output_dir must be on a filesystem all machines share")
        _set_rng_state(torch.load(rng_file, weights_only=False), self.generator)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.global_step, self.epoch,
                    self.batch_in_epoch)

    # -------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self):
        args = self.args
        if not args.validation_prompts or not self.rt.is_main:
            return None
        from ..sampling import sample
        from ..vae import decode_latents

        m = self.models
        out_dir = os.path.join(args.output_dir, "sample")
        os.makedirs(out_dir, exist_ok=True)
        context = self.ema.applied(m.trainable) if self.ema is not None else contextlib.nullcontext()
        was_training = m.transformer.training
        m.transformer.eval()
        written = []
        try:
            with context, torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                         enabled=args.mixed_precision != "no"):
                neg, neg_mask = self.encoders.text([args.validation_negative_prompt], clean=True)
                frames = args.sample_n_frames if args.video else 1
                latent = args.sample_size // 8
                for i, prompt in enumerate(args.validation_prompts):
                    embeds, mask = self.encoders.text([prompt], clean=True)
                    generator = torch.Generator(self.device).manual_seed(args.seed)
                    latents = sample(m.transformer, scheduler=args.validation_sampler,
                                     steps=args.validation_inference_steps,
                                     guidance_scale=args.validation_guidance_scale, prompt_embeds=embeds.float(),
                                     prompt_attention_mask=mask, negative_prompt_embeds=neg.float(),
                                     negative_prompt_attention_mask=neg_mask, generator=generator,
                                     shape=(1, 4, frames, latent, latent))
                    video = decode_latents(m.vae, latents.to(next(m.vae.parameters()).dtype))
                    written.append(export.write_preview(video[0], os.path.join(
                        out_dir, f"sample-{self.global_step}-{i}"), fps=12))
        finally:
            m.transformer.train(was_training)
        return written

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        args = self.args
        accum = args.gradient_accumulation_steps
        if args.resume_from_checkpoint:
            path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
            if path is None:
                logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", args.output_dir)
            else:
                self.resume(path)
        from tqdm.auto import tqdm

        progress = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.rt.is_main,
                        desc=f"train {args.mode}")
        # every batch counts as a micro-batch, also one whose media all failed, so that all processes step together
        micro, window, samples_seen, t0 = 0, [0.0, 0, 0], 0, time.perf_counter()
        done = self.global_step >= self.total_steps
        while not done and (args.max_train_steps or self.epoch < args.num_train_epochs):
            loader = epoch_loader(self.planner, self.epoch, self.batch_in_epoch, args.dataloader_num_workers,
                                  self.rt.rank, self.rt.world)
            for batch in loader:
                self.batch_in_epoch += 1
                for item, reason in batch["skipped"]:
                    self.skips.add(item, reason)
                micro += 1
                if batch["pixel_values"] is not None:
                    loss = self.forward_loss(batch)
                    self.scaler.scale(loss / accum).backward()
                    window = [window[0] + float(loss.detach()), window[1] + 1,
                              window[2] + batch["pixel_values"].shape[0]]
                if micro % accum:
                    continue
                totals = self.optimizer_step(*window)
                window = [0.0, 0, 0]
                if totals is None:
                    continue
                self.global_step += 1
                self.losses.append(totals["loss"])
                samples_seen += totals["samples"]
                progress.update(1)
                progress.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}",
                                     samples_s=f"{samples_seen / max(time.perf_counter() - t0, 1e-9):.2f}")
                if self.global_step % args.checkpointing_steps == 0:
                    self.save_checkpoint()
                if self.global_step % args.validation_steps == 0:
                    self.validate()
                if self.global_step >= self.total_steps:
                    done = True
                    break
            if not done:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        progress.close()
        self.merge_skips()
        self.rt.check_replicas(self.models.trainable.values())
        outputs = export.save_final(self) if self.rt.is_main else {}
        self.rt.barrier()
        summary = self.skips.summary()
        if self.rt.is_main:
            (logger.warning if len(self.skips) else logger.info)("data: %s", summary)
            print(f"training done: {self.global_step} steps on {self.rt.world} process(es); data: {summary}")
        return {"outputs": outputs, "losses": self.losses, "global_step": self.global_step,
                "skipped": len(self.skips), "skip_summary": summary}


def train(args) -> dict:
    """The command: one process, or one of those `accelerate launch` started (only the main one logs progress and
    writes files)."""
    prefix = f"[rank {os.environ.get('RANK', '?')}] " if launched_world_size() > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {prefix}%(name)s: %(message)s")
    runtime = Runtime.from_environment(args.device)
    if not runtime.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if runtime.is_main and launcher_precision not in ("no", args.mixed_precision):
        logger.warning("accelerate launch --mixed_precision %s is ignored: this command's --mixed_precision (%s) "
                       "sets autocast and loss scaling", launcher_precision, args.mixed_precision)
    return Trainer(args, runtime).run()
