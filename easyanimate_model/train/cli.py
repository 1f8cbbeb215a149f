"""Command line of `python -m easyanimate_model.train` (argument names follow the original EasyAnimate scripts).

Only argparse/os are imported at module level so that `--help` is instant; arguments and dataset paths are checked
before any model is loaded.
"""
from __future__ import annotations

import argparse
import os

from ..config import IMAGE_SIZE_MULTIPLE, SIZE_MULTIPLE

MODES = ("motion", "t2i", "lora", "video_lora")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
# what each mode trains by default (docs/MODEL.md §D.1; substrings of parameter names). t2i trains everything; the
# reference's "." missed the top-level `scale_shift_table` (no dot in its name), "" matches every parameter.
DEFAULT_TRAINABLE = {"motion": ["attn_temporal"], "t2i": [""]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m easyanimate_model.train",
        description="Train EasyAnimate v1: the motion module (motion), the 2D PixArt DiT (t2i), a LoRA on the DiT "
                    "(lora, optionally on T5 too) or a LoRA on the video model (video_lora). Outputs load unchanged "
                    "in easyanimate_model.load_transformer / merge_lora and in the ComfyUI nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", choices=MODES, default="motion")
    a("--pretrained_model_name_or_path", required=True,
      help="PixArt-alpha diffusers folder (transformer/, vae/, text_encoder/, tokenizer/)")
    a("--transformer_path", default=None,
      help="full or 2D checkpoint loaded on top of the pretrained transformer (e.g. the portrait checkpoint)")
    a("--motion_module_path", default=None, help="existing motion module (easyanimate_v1_mm.safetensors) to start from")
    a("--output_dir", default="output_dir")
    a("--seed", type=int, default=42)
    # data
    a("--train_data_dir", default=None, help="media root (paths in the metadata are relative to it)")
    a("--train_data_meta", default=None,
      help="JSON list {file_path, text, type}, WebVid CSV {videoid, name, page_dir}, or an imagefolder metadata.jsonl "
           "(default: <train_data_dir>/metadata.jsonl)")
    a("--train_data_format", choices=("auto", "normal", "webvid", "diffusers"), default="auto",
      help="auto: by the metadata extension (.json normal, .csv webvid, .jsonl diffusers imagefolder)")
    a("--image_column", default="image", help="imagefolder: file column when there is no 'file_name'")
    a("--caption_column", default="text", help="imagefolder: caption column")
    a("--sample_size", type=int, default=512, help="training resolution (square side, or the bucket scale)")
    a("--sample_n_frames", type=int, default=16)
    a("--sample_stride", type=int, default=2)
    a("--enable_bucket", action="store_true", help="aspect-ratio buckets (ASPECT_RATIO_512 scaled to sample_size)")
    a("--random_ratio_crop", action="store_true", help="per-batch random target ratio (needs --enable_bucket)")
    a("--random_frame_crop", action="store_true", help="keep the first k frames, k in {4,8,...,n}, p ~ k")
    a("--no_flip", action="store_true", help="disable the random horizontal flip")
    a("--dataloader_num_workers", type=int, default=0)
    # optimisation
    a("--train_batch_size", type=int, default=2)
    a("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    a("--num_train_epochs", type=int, default=100)
    a("--learning_rate", type=float, default=2e-5)
    a("--text_encoder_lr", type=float, default=None, help="LoRA on T5 (default learning_rate / 2)")
    a("--trainable_modules", nargs="+", default=None,
      help="parameter-name substrings to train (default: attn_temporal for motion, everything for t2i)")
    a("--trainable_modules_low_learning_rate", nargs="+", default=[],
      help="parameter-name substrings trained at learning_rate / 10")
    a("--lr_scheduler", choices=LR_SCHEDULERS, default="constant_with_warmup")
    a("--lr_warmup_steps", type=int, default=100)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_grad_norm", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=3e-2)
    a("--adam_epsilon", type=float, default=1e-10)
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default="bf16")
    a("--gradient_checkpointing", action="store_true")
    a("--use_ema", action="store_true")
    a("--ema_decay", type=float, default=0.9999)
    a("--vae_mini_batch", type=int, default=16, help="frames per VAE encode call")
    a("--cache_dir", default=None,
      help="cache frozen-model outputs on disk: T5 embeddings per caption and VAE latent distributions per "
           "preprocessed clip (re-used when the same crop recurs)")
    # LoRA
    a("--rank", type=int, default=128)
    a("--network_alpha", type=float, default=64.0)
    a("--train_text_encoder", action="store_true", help="lora mode: LoRA on T5 as well (lora_te_*)")
    # checkpoints and validation
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a checkpoint-<step> folder, or 'latest'")
    a("--validation_prompts", nargs="+", default=None)
    a("--validation_negative_prompt", default="bad detailed")
    a("--validation_steps", type=int, default=2000)
    a("--validation_sampler", choices=("Euler", "Euler A", "DPM++", "PNDM", "DDIM"), default="DPM++")  # sampling.SCHEDULERS
    a("--validation_inference_steps", type=int, default=30)
    a("--validation_guidance_scale", type=float, default=6.0)
    a("--device", default=None, help="default: the accelerate device, else cuda if available, else cpu")
    return p


def _fail(parser, message):
    parser.error(message)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments (values and paths only; nothing heavy is imported)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ["train_batch_size", "gradient_accumulation_steps", "sample_size", "sample_n_frames", "sample_stride",
                "checkpointing_steps", "validation_steps", "vae_mini_batch", "rank", "num_train_epochs"]
    for name in positive:
        if getattr(args, name) <= 0:
            _fail(parser, f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        _fail(parser, f"--max_train_steps must be > 0, got {args.max_train_steps}")
    if args.learning_rate <= 0:
        _fail(parser, f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.lr_warmup_steps < 0 or args.max_grad_norm < 0 or args.dataloader_num_workers < 0:
        _fail(parser, "--lr_warmup_steps, --max_grad_norm and --dataloader_num_workers must be >= 0")
    video = args.mode in ("motion", "video_lora")
    # the motion module attends over 2x2 windows of the latent patch grid: pixel sides must be multiples of 32
    unit = SIZE_MULTIPLE if video else IMAGE_SIZE_MULTIPLE
    if args.sample_size % unit:
        _fail(parser, f"--sample_size must be a multiple of {unit} for --mode {args.mode}, got {args.sample_size}")
    if args.random_ratio_crop and not args.enable_bucket:
        _fail(parser, "--random_ratio_crop needs --enable_bucket")
    if args.train_text_encoder and args.mode != "lora":
        _fail(parser, "--train_text_encoder is only supported with --mode lora")
    if args.mode in ("lora", "video_lora") and (args.trainable_modules or args.trainable_modules_low_learning_rate):
        _fail(parser, "--trainable_modules* do not apply to LoRA modes (only the LoRA weights train)")
    if args.train_data_dir is None and args.train_data_meta is None:
        _fail(parser, "give --train_data_dir and/or --train_data_meta")
    for name in ("pretrained_model_name_or_path", "transformer_path", "motion_module_path"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            _fail(parser, f"--{name} {path!r}: not found")
    if args.mode == "t2i" and args.motion_module_path:
        _fail(parser, "--motion_module_path does not apply to --mode t2i (the 2D DiT)")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        _fail(parser, f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: expected a checkpoint-<step> "
                      "folder or 'latest'")
    if args.trainable_modules is None:
        args.trainable_modules = DEFAULT_TRAINABLE.get(args.mode, [])
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate / 2
    args.video = video
    return args


def main(argv=None):
    args = parse_args(argv)
    from ..loading import EasyAnimateLoadError
    from .data import DatasetError
    from .loop import LaunchError, train

    try:
        return train(args)
    except (DatasetError, EasyAnimateLoadError, LaunchError) as e:
        raise SystemExit(f"error: {e}") from None
