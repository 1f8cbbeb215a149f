"""Training data: metadata readers, frame sampling, aspect-ratio buckets, crops and resumable batch plans
(docs/MODEL.md §D.3/§D.4).

Every batch is homogeneous (all images or all videos, one target size). The batch order of an epoch and all per-batch
randomness (frame start, flips, random crop ratio, frame crop) derive from (seed, epoch, batch index) only, so a run
resumed at batch k of epoch e sees exactly the batches an uninterrupted run would have seen.
Unreadable or missing media and bad metadata rows are skipped with a warning and counted in a `SkipLog`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# PixArt/EasyAnimate aspect-ratio buckets at 512 px: "h/w" -> [height, width] (ASPECT_RATIO_512, 40 entries).
ASPECT_RATIO_512 = {
    "0.25": (256, 1024), "0.26": (256, 992), "0.27": (256, 960), "0.28": (256, 928),
    "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832), "0.4": (320, 800),
    "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576),
    "0.78": (448, 576), "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512),
    "1.0": (512, 512), "1.07": (512, 480), "1.13": (544, 480), "1.21": (544, 448),
    "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416), "1.67": (640, 384),
    "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "2.89": (832, 288), "3.0": (864, 288), "3.11": (896, 288),
    "3.62": (928, 256), "3.75": (960, 256), "3.88": (992, 256), "4.0": (1024, 256),
}
# The "adaptive" random-ratio crop: 15 ratios and their relative probabilities (ASPECT_RATIO_RANDOM_CROP_512/_PROB).
ASPECT_RATIO_RANDOM_CROP_512 = {
    "0.42": (320, 768), "0.5": (352, 704), "0.57": (384, 672), "0.68": (416, 608), "0.78": (448, 576),
    "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480), "1.13": (544, 480),
    "1.29": (576, 448), "1.46": (608, 416), "1.75": (672, 384), "2.0": (704, 352), "2.4": (768, 320),
}
ASPECT_RATIO_RANDOM_CROP_PROB = (1, 2, 4, 4, 4, 4, 8, 8, 8, 4, 4, 4, 4, 2, 1)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
DATA_FORMATS = ("auto", "normal", "webvid", "diffusers")


class DatasetError(ValueError):
    """The dataset as a whole is unusable (missing file, wrong columns, no usable row)."""


class MediaError(RuntimeError):
    """One media file could not be used; the sample is skipped."""


@dataclass(frozen=True)
class Sample:
    path: str
    text: str
    type: str  # "video" | "image"
    source: str  # "<metadata file>:<row>" for warnings
    height: int | None = None
    width: int | None = None


class SkipLog:
    """Counts skipped rows/samples by reason; each distinct item is warned about (and counted) once."""

    def __init__(self):
        self.items: dict[str, str] = {}

    def add(self, item: str, reason: str) -> bool:
        if item in self.items:
            return False
        self.items[item] = reason
        logger.warning("skipping %s: %s", item, reason)
        return True

    def counts(self) -> Counter:
        return Counter(reason.split(":")[0] for reason in self.items.values())

    def __len__(self):
        return len(self.items)

    def summary(self) -> str:
        if not self.items:
            return "no samples skipped"
        return f"{len(self.items)} samples skipped (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items())) + ")"

    def state_dict(self) -> dict:
        return dict(self.items)

    def load_state_dict(self, state: dict):
        self.items = dict(state)

    def merge(self, items: dict):
        """Add another log's items (another process's skips) without warning again."""
        for item, reason in items.items():
            self.items.setdefault(item, reason)


# ----------------------------------------------------------------------------------------------------------- metadata

def _media_type(path: str) -> str:
    return "video" if path.lower().endswith(VIDEO_EXTENSIONS) else "image"


def _int_or_none(value):
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _row_sample(row: dict, root: str, source: str, skips: SkipLog, path_key: str, text_key: str) -> Sample | None:
    """A `Sample` from a normal-format row ({file_path, text, type?, width?, height?}), or None (skipped)."""
    if not isinstance(row, dict):
        skips.add(source, f"bad row: expected an object, found {type(row).__name__}")
        return None
    for key in (path_key, text_key):
        if row.get(key) in (None, ""):
            skips.add(source, f"missing column: no '{key}'")
            return None
    path = os.path.join(root, str(row[path_key]))
    kind = row.get("type") or _media_type(path)
    if kind not in ("video", "image"):
        skips.add(source, f"bad type: expected 'video' or 'image', found {kind!r}")
        return None
    return Sample(path, str(row[text_key]), kind, source, _int_or_none(row.get("height")), _int_or_none(row.get("width")))


def _read_csv(meta: str, root: str, skips: SkipLog) -> list[Sample]:
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if {"videoid", "name", "page_dir"} <= set(header):
            webvid = True
        elif {"file_path", "text"} <= set(header):
            webvid = False
        else:
            raise DatasetError(f"{meta}: expected WebVid columns videoid,name,page_dir or file_path,text; "
                               f"found columns {header}")
        samples = []
        for i, row in enumerate(reader, start=2):
            source = f"{meta}:{i}"
            if not webvid:
                sample = _row_sample(row, root, source, skips, "file_path", "text")
            elif any(row.get(k) in (None, "") for k in ("videoid", "name")):
                missing = [k for k in ("videoid", "name") if row.get(k) in (None, "")]
                skips.add(source, f"missing column: no {missing}")
                sample = None
            else:
                sample = Sample(os.path.join(root, f"{row['videoid']}.mp4"), row["name"], "video", source)
            if sample is not None:
                samples.append(sample)
    return samples


def _read_json(meta: str, root: str, skips: SkipLog) -> list[Sample]:
    with open(meta, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta}: not valid JSON ({e}); expected a list of "
                               '{"file_path", "text", "type"} objects') from None
    if not isinstance(rows, list):
        raise DatasetError(f"{meta}: expected a JSON list of {{\"file_path\", \"text\", \"type\"}} objects, "
                           f"found {type(rows).__name__}")
    out = (_row_sample(row, root, f"{meta}:[{i}]", skips, "file_path", "text") for i, row in enumerate(rows))
    return [s for s in out if s is not None]


def _read_imagefolder(meta: str, skips: SkipLog, image_column: str, caption_column: str) -> list[Sample]:
    """diffusers/HF `imagefolder` layout: metadata.jsonl lines {file_name, <caption_column>} next to the images."""
    root = os.path.dirname(meta)
    samples = []
    with open(meta, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{meta}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skips.add(source, f"bad row: not JSON ({e})")
                continue
            key = "file_name" if isinstance(row, dict) and "file_name" in row else image_column
            sample = _row_sample(row, root, source, skips, key, caption_column)
            if sample is not None:
                samples.append(sample)
    return samples


def resolve_format(train_data_dir: str | None, train_data_meta: str | None, fmt: str = "auto") -> tuple[str, str, str]:
    """(format, metadata file, media root) after checking that the paths exist; raises DatasetError otherwise."""
    if fmt not in DATA_FORMATS:
        raise DatasetError(f"--train_data_format: expected one of {DATA_FORMATS}, found {fmt!r}")
    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise DatasetError(f"--train_data_dir {train_data_dir!r}: expected a directory, found "
                           f"{'a file' if os.path.exists(train_data_dir) else 'nothing'}")
    meta = train_data_meta
    if meta is None:
        candidate = os.path.join(train_data_dir or "", "metadata.jsonl")
        if train_data_dir is None or not os.path.isfile(candidate):
            raise DatasetError("no --train_data_meta given and no metadata.jsonl (imagefolder layout) in "
                               f"--train_data_dir {train_data_dir!r}")
        meta = candidate
    if not os.path.isfile(meta):
        raise DatasetError(f"--train_data_meta {meta!r}: file not found")
    if fmt == "auto":
        ext = os.path.splitext(meta)[1].lower()
        fmt = {".csv": "webvid", ".json": "normal", ".jsonl": "diffusers"}.get(ext)
        if fmt is None:
            raise DatasetError(f"--train_data_meta {meta!r}: cannot tell the format from the extension {ext!r}; "
                               "expected .json (normal), .csv (webvid) or .jsonl (diffusers imagefolder), "
                               "or pass --train_data_format")
    root = train_data_dir if train_data_dir is not None else os.path.dirname(os.path.abspath(meta))
    return fmt, meta, root


def read_metadata(train_data_dir, train_data_meta=None, fmt="auto", skips: SkipLog | None = None,
                  image_column="image", caption_column="text") -> list[Sample]:
    """All usable rows of a dataset (bad rows are skipped and counted in `skips`). Media files are not opened."""
    skips = skips if skips is not None else SkipLog()
    fmt, meta, root = resolve_format(train_data_dir, train_data_meta, fmt)
    if fmt == "diffusers":
        samples = _read_imagefolder(meta, skips, image_column, caption_column)
    elif meta.lower().endswith(".csv"):
        samples = _read_csv(meta, root, skips)
    else:
        samples = _read_json(meta, root, skips)
    if not samples:
        raise DatasetError(f"{meta}: no usable rows ({skips.summary()})")
    return samples


# ------------------------------------------------------------------------------------------------------------- media

def frame_indices(num_frames: int, n_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Spec D.4: a clip of min(num_frames, (n-1)*stride+1) frames at a random start, n indices by linspace, int-cast."""
    clip_length = min(num_frames, (n_frames - 1) * stride + 1)
    start = int(rng.integers(0, num_frames - clip_length + 1))
    return np.linspace(start, start + clip_length - 1, n_frames).astype(int)


def _open_video(path):
    import imageio.v3 as iio

    plugin = "pillow" if path.lower().endswith(".gif") else "pyav"
    return iio.imopen(path, "r", plugin=plugin)


def probe_size(sample: Sample) -> tuple[int, int]:
    """(height, width) of a sample without decoding it all."""
    if sample.height and sample.width:
        return sample.height, sample.width
    if not os.path.isfile(sample.path):
        raise MediaError("missing file")
    try:
        if sample.type == "image":
            from PIL import Image

            with Image.open(sample.path) as img:
                return img.height, img.width
        with _open_video(sample.path) as f:
            shape = f.properties().shape
        return int(shape[-3]), int(shape[-2])
    except Exception as e:  # any decoder failure means this file cannot be trained on
        raise MediaError(f"unreadable: {type(e).__name__}: {e}") from None


def load_frames(sample: Sample, n_frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames [F, H, W, 3]; images give F=1, videos F=n_frames (n_frames=1: one random frame)."""
    if not os.path.isfile(sample.path):
        raise MediaError("missing file")
    try:
        if sample.type == "image":
            from PIL import Image

            with Image.open(sample.path) as img:
                return np.array(img.convert("RGB"))[None]
        with _open_video(sample.path) as f:
            total = int(f.properties().shape[0])
            if total < 1:
                raise MediaError("unreadable: no frames")
            wanted = frame_indices(total, n_frames, stride, rng)
            needed = set(wanted.tolist())
            frames = {}
            # decode sequentially and stop after the last wanted frame (no random seeks in long videos)
            for i, frame in enumerate(f.iter()):
                if i in needed:
                    frames[i] = np.asarray(frame)[..., :3]
                    if len(frames) == len(needed):
                        break
    except MediaError:
        raise
    except Exception as e:  # any decoder failure means this file cannot be trained on
        raise MediaError(f"unreadable: {type(e).__name__}: {e}") from None
    if len(frames) < len(needed):
        raise MediaError(f"unreadable: decoded {len(frames)} of the {len(needed)} needed frames")
    return np.stack([frames[i] for i in wanted.tolist()])


# --------------------------------------------------------------------------------------------------- sizes and crops

def scaled_table(table: dict, sample_size: int, multiple: int) -> dict:
    """A 512-px ratio table scaled to `sample_size`, each side floored to a multiple of `multiple`."""
    return {k: tuple(int(v * sample_size / 512) // multiple * multiple for v in hw) for k, hw in table.items()}


def closest_bucket(height: int, width: int, buckets: dict) -> str:
    ratio = height / width
    return min(buckets, key=lambda k: abs(float(k) - ratio))


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Smallest aspect-preserving size that covers the target (the side that limits is set exactly)."""
    if target_h / height > target_w / width:
        return target_h, int(width * target_h / height)
    return int(height * target_w / width), target_w


def resize_crop(frames: torch.Tensor, target_h: int, target_w: int) -> torch.Tensor:
    """[F, C, H, W] float -> resize to cover (bilinear, antialiased) -> center crop to [F, C, target_h, target_w]."""
    nh, nw = cover_size(frames.shape[-2], frames.shape[-1], target_h, target_w)
    nh, nw = max(nh, target_h), max(nw, target_w)
    if (nh, nw) != tuple(frames.shape[-2:]):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((nh - target_h) / 2.0)), int(round((nw - target_w) / 2.0))
    return frames[..., top:top + target_h, left:left + target_w]


def random_frame_crop_length(n_frames: int, rng: np.random.Generator) -> int:
    """Spec D.4 --random_frame_crop: k in {4, 8, ..., n} with probability proportional to k."""
    choices = np.arange(4, n_frames + 1, 4)
    if len(choices) == 0:
        return n_frames
    return int(rng.choice(choices, p=choices / choices.sum()))


# ---------------------------------------------------------------------------------------------------- batches

@dataclass
class DataConfig:
    sample_size: int = 512
    n_frames: int = 16  # 1 for image models (videos then give one random frame)
    stride: int = 2
    enable_bucket: bool = False
    random_ratio_crop: bool = False
    random_frame_crop: bool = False
    flip: bool = True
    size_multiple: int = 16  # 32 for the motion module (its 2x2 grid needs an even latent patch grid)


class BatchPlanner:
    """Turns samples into homogeneous, bucketed batches per epoch and loads them (picklable, for DataLoader workers)."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, batch_size: int, seed: int, skips: SkipLog):
        self.samples, self.cfg, self.batch_size, self.seed, self.skips = samples, cfg, batch_size, seed, skips
        self.buckets = scaled_table(ASPECT_RATIO_512, cfg.sample_size, cfg.size_multiple)
        self.crop_sizes = scaled_table(ASPECT_RATIO_RANDOM_CROP_512, cfg.sample_size, cfg.size_multiple)
        self._sizes: dict[int, tuple[int, int] | None] = {}

    def _size(self, index: int):
        if index not in self._sizes:
            sample = self.samples[index]
            try:
                self._sizes[index] = probe_size(sample)
            except MediaError as e:
                self.skips.add(f"{sample.path} ({sample.source})", str(e))
                self._sizes[index] = None
        return self._sizes[index]

    def plan(self, epoch: int) -> list[list[int]]:
        """Batches of sample indices for one epoch: a seeded permutation grouped by (type, bucket); partial groups dropped."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        groups: dict[tuple, list[int]] = {}
        batches = []
        for index in order.tolist():
            key = (self.samples[index].type,)
            if self.cfg.enable_bucket:
                size = self._size(index)
                if size is None:
                    continue
                key += (closest_bucket(*size, self.buckets),)
            group = groups.setdefault(key, [])
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(group[:])
                group.clear()
        return batches

    def target_size(self, first_hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        if self.cfg.random_ratio_crop:
            keys = list(self.crop_sizes)
            p = np.asarray(ASPECT_RATIO_RANDOM_CROP_PROB, dtype=np.float64)
            return self.crop_sizes[keys[rng.choice(len(keys), p=p / p.sum())]]
        if self.cfg.enable_bucket:
            return self.buckets[closest_bucket(*first_hw, self.buckets)]
        return self.cfg.sample_size, self.cfg.sample_size

    def load(self, epoch: int, batch_index: int, indices: list[int]) -> dict:
        """{"pixel_values" [B, F, 3, H, W] in [-1, 1], "text", "type", "skipped" [(item, reason)]}.

        Samples whose media fail are dropped from the batch (reported in "skipped"); the batch may come back empty.
        """
        rng = np.random.default_rng([self.seed, epoch, batch_index])
        cfg = self.cfg
        clips, texts, skipped = [], [], []
        for index in indices:
            sample = self.samples[index]
            try:
                frames = load_frames(sample, cfg.n_frames, cfg.stride, rng)
            except MediaError as e:
                skipped.append((f"{sample.path} ({sample.source})", str(e)))
                continue
            clips.append(frames)
            texts.append(sample.text)
        kind = self.samples[indices[0]].type if indices else "video"
        if not clips:
            return {"pixel_values": None, "text": [], "type": kind, "skipped": skipped}
        target = self.target_size(clips[0].shape[1:3], rng)
        out = []
        for frames in clips:
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
            if cfg.flip and rng.random() < 0.5:
                x = x.flip(-1)
            out.append(resize_crop(x, *target) * 2.0 - 1.0)
        pixel_values = torch.stack(out)
        if cfg.random_frame_crop and pixel_values.shape[1] > 1:
            pixel_values = pixel_values[:, :random_frame_crop_length(pixel_values.shape[1], rng)]
        return {"pixel_values": pixel_values.contiguous(), "text": texts, "type": kind, "skipped": skipped}


class EpochBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item i is batch i of one epoch's plan (DataLoader with batch_size=None)."""

    def __init__(self, planner: BatchPlanner, epoch: int, batches: list[tuple[int, list[int]]]):
        self.planner, self.epoch, self.batches = planner, epoch, batches  # (batch index in the epoch, samples)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.planner.load(self.epoch, *self.batches[i])


def _identity(batch):
    return batch


def epoch_loader(planner: BatchPlanner, epoch: int, start_batch: int = 0, num_workers: int = 0, rank: int = 0,
                 world: int = 1):
    """DataLoader over this process's batches of the epoch, from batch `start_batch` (of this process) on.

    With several processes each takes every `world`-th batch; all get the same count (DDP needs equal steps).
    """
    batches = list(enumerate(planner.plan(epoch)))
    batches = batches[:len(batches) // world * world][rank::world]
    dataset = EpochBatches(planner, epoch, batches)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start_batch, len(batches)),
                                       num_workers=num_workers, collate_fn=_identity)
