"""Reading model files: the one reader behind every weights file and JSON file the library and the nodes open.

Formats are recognised from the content, not the name (docs/MODEL.md §B.7): safetensors (its header is read and
checked against the file size before any tensor), torch.save zip checkpoints and legacy pickles (only through
`torch.load(weights_only=True)`: no pickle code runs), and diffusers `*.index.json` shard indexes. Anything else (a
Git LFS pointer, an HTML page, a truncated download, a pickle with Python objects) is an `EasyAnimateLoadError`
naming the file, what was expected and what was found.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import EasyAnimateLoadError

def first_names(names, n=5) -> str:
    """The first `n` of `names`, sorted, for messages."""
    names = sorted(names)
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def describe(path) -> str:
    """What is at `path`, for the "found ..." part of a message."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        return f"a folder with {first_names(names, 8)}" if names else "an empty folder"
    if path.is_file():
        kind = _sniff(path)
        return {"safetensors": "a safetensors file", "zip": "a PyTorch zip checkpoint (torch.save)",
                "pickle": "a pickle file"}.get(kind, kind)
    return "nothing: not found"


def read_json(path, what: str = "a JSON file") -> dict:
    """The JSON object in `path`; a missing, unreadable or non-object file is an EasyAnimateLoadError."""
    path = Path(path)
    if not path.is_file():
        raise EasyAnimateLoadError(f"{path}: expected {what}, found {describe(path)}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EasyAnimateLoadError(f"{path}: expected {what}, could not read it ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise EasyAnimateLoadError(f"{path}: expected {what} (a JSON object), found a JSON {type(value).__name__}")
    return value


def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save / pickle), or a description of what it is."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file (the weights were never downloaded)"
    if head.lstrip()[:1] == b"<":
        return "an HTML/XML page (a failed download?)"
    return f"unrecognised content ({size} bytes, starting with {head[:16]!r})"


def read_safetensors_header(path) -> tuple[dict[str, tuple[str, tuple]], dict]:
    """{key: (dtype name, shape)} and the metadata of a safetensors file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    kind = _sniff(path)
    if kind != "safetensors":
        what = {"zip": "a PyTorch zip checkpoint (torch.save)", "pickle": "a pickle file"}.get(kind, kind)
        raise EasyAnimateLoadError(f"{path}: expected a safetensors file, found {what}")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise EasyAnimateLoadError(
                f"{path}: truncated safetensors file: the header says {header_len} header bytes, the file has only "
                f"{size} bytes in all (an interrupted download or copy?)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EasyAnimateLoadError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise EasyAnimateLoadError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    entries, data_end = {}, 0
    try:
        for key, info in header.items():
            entries[key] = (info["dtype"], tuple(info["shape"]))
            data_end = max(data_end, info["data_offsets"][1])
    except (KeyError, TypeError, IndexError):
        raise EasyAnimateLoadError(f"{path}: corrupt safetensors header (entry {key!r}: {info!r})") from None
    if 8 + header_len + data_end > size:
        raise EasyAnimateLoadError(
            f"{path}: truncated safetensors file: the tensors need {8 + header_len + data_end} bytes, the file has "
            f"{size} (an interrupted download or copy?)")
    return entries, metadata


def _torch_load(path: Path, kind: str) -> dict:
    try:
        # mmap keeps a zip checkpoint on disk until each tensor is used (legacy pickles cannot be mapped)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EasyAnimateLoadError(
            f"{path}: this pickle checkpoint holds Python objects other than tensors, which are not loaded for safety "
            f"(torch.load(weights_only=True) refused: {first}). Convert it to .safetensors from a trusted "
            f"environment") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / ValueError for damaged files
        raise EasyAnimateLoadError(
            f"{path}: expected a PyTorch checkpoint (torch.save of a state dict), could not read it: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EasyAnimateLoadError(f"{path}: expected a state dict (a dict of tensors), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise EasyAnimateLoadError(
            f"{path}: expected a state dict (a dict of tensors), found a dict without tensors "
            f"(keys: {first_names(map(str, obj))})")
    return tensors


def load_state_dict_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a .safetensors file, a pickle checkpoint (.ckpt/.pt/.pth/.bin) or a shard index.

    The format is read from the content, not the name; a `.safetensors` name on something else is an error.
    Pickles go through `torch.load(weights_only=True)` only; a top-level `"state_dict"` wrapper is unwrapped.
    """
    weights = open_weights(path)
    return weights.read(weights.keys()), weights.metadata


CAST_CHUNK = 64 * 2 ** 20  # elements read per mapping when casting (256 MB of fp32)


def _chunked(keys: list, shapes: dict, limit):
    """`keys` in runs of at most `limit` elements (at least one key each); all in one run when `limit` is None."""
    if limit is None:
        yield keys
        return
    part, size = [], 0
    for k in keys:
        if part and size + math.prod(shapes[k]) > limit:
            yield part
            part, size = [], 0
        part.append(k)
        size += math.prod(shapes[k])
    if part:
        yield part


class CheckpointFile:
    """Key names and shapes of one weights file (safetensors: from the header only), tensors read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise EasyAnimateLoadError(f"{self.path}: expected a weights file, found "
                                       f"{'a folder' if self.path.is_dir() else 'nothing (no such file)'}")
        kind = _sniff(self.path)
        self.metadata: dict = {}
        self._tensors = None
        if kind == "safetensors" or self.path.suffix.lower() == ".safetensors":
            entries, self.metadata = read_safetensors_header(self.path)
            self.shapes = {k: s for k, (_, s) in entries.items()}
        elif kind in ("zip", "pickle"):
            self._tensors = _torch_load(self.path, kind)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise EasyAnimateLoadError(
                f"{self.path}: expected a .safetensors file or a PyTorch checkpoint, found {kind}")

    def keys(self):
        return list(self.shapes)

    def read(self, keys, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
        """The tensors of `keys`, each cast to `dtype` (if given) as it is read."""
        def cast(t):
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        if self._tensors is not None:
            return {k: cast(self._tensors[k]) for k in keys}
        try:
            # a cast touches the file's pages, which stay resident while that mapping is open: a fresh mapping per
            # chunk keeps the peak at the result plus one chunk (uncast tensors stay file-backed and touch nothing)
            out = {}
            for part in _chunked(list(keys), self.shapes, CAST_CHUNK if dtype is not None else None):
                with safe_open(str(self.path), framework="pt", device="cpu") as f:
                    out.update({k: cast(f.get_tensor(k)) for k in part})
            return out
        except (OSError, RuntimeError) as e:  # SafetensorError is a RuntimeError
            raise EasyAnimateLoadError(f"{self.path}: expected a readable safetensors file, reading it failed: "
                                       f"{type(e).__name__}: {e}") from None


class ShardedCheckpoint:
    """The shards of a diffusers / transformers `*.index.json` (safetensors or pickle shards) as one checkpoint."""

    def __init__(self, index_path):
        index_path = Path(index_path)
        weight_map = read_json(index_path, "a shard index (*.index.json)").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise EasyAnimateLoadError(f"{index_path}: expected a shard index with a 'weight_map' of key -> shard "
                                       f"file, found {type(weight_map).__name__}")
        self.path = index_path
        self.metadata = {}
        self.shards = {name: CheckpointFile(index_path.parent / name) for name in sorted(set(weight_map.values()))}
        self._where = {}
        for name, shard in self.shards.items():
            for key in shard.keys():
                self._where[key] = name
        missing = set(weight_map) - set(self._where)
        if missing:
            raise EasyAnimateLoadError(f"{index_path}: the index lists {len(missing)} keys that no shard holds: "
                                       f"{first_names(missing)}")
        self.shapes = {k: self.shards[n].shapes[k] for k, n in self._where.items()}

    def keys(self):
        return list(self.shapes)

    def read(self, keys, dtype=None, device="cpu"):
        out = {}
        for name, shard in self.shards.items():
            wanted = [k for k in keys if self._where[k] == name]
            if wanted:
                out.update(shard.read(wanted, dtype, device))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Recognising files that are not EasyAnimate / PixArt-alpha weights


def identify_foreign(shapes: dict[str, tuple]) -> str | None:
    """What a state dict is when it is a known kind of file that is NOT an EasyAnimate/PixArt-alpha transformer."""
    keys = list(shapes)

    def has(pattern):
        return next((k for k in keys if re.search(pattern, k)), None)

    lora = has(r"(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up)\.weight$")
    if lora:
        return (f"a LoRA (e.g. '{lora}'), not a model: load it with merge_lora() / the EasyAnimate LoRA loader node "
                f"on top of a transformer")
    if has(r"(^|\.)(down|up|mid)_blocks?\.(\d+\.)?motion_modules\."):
        return ("an AnimateDiff motion module (keys 'down_blocks.N.motion_modules...', for SD1.5 UNets); "
                "EasyAnimate v1's motion module has keys 'transformer_blocks.N.attn_temporal...'")
    if has(r"(^|\.)label_emb\."):
        return "an SDXL UNet checkpoint ('label_emb' keys, 2816-wide class embedding)"
    if has(r"^(model\.diffusion_model\.)?input_blocks\."):
        return "a Stable Diffusion 1.x/2.x UNet checkpoint ('model.diffusion_model.input_blocks...' keys)"
    if has(r"^(unet\.)?down_blocks\.\d+\.resnets\."):
        return "a diffusers UNet2DConditionModel (Stable Diffusion) ('down_blocks.N.resnets...' keys)"
    if has(r"^(first_stage_model\.|vae\.)?(encoder\.down|decoder\.up)(_blocks)?\.") and not has(r"transformer_blocks"):
        return "a VAE ('encoder.down...' / 'decoder.up...' keys); load it with the VAE loader"
    if has(r"^(encoder\.)?block\.\d+\.layer\.\d+\.(SelfAttention|DenseReluDense)"):
        return "a T5 text encoder ('encoder.block.N.layer...' keys); load it with the T5 loader"
    y_emb = shapes.get("y_embedder.y_embedding")
    if y_emb is not None and y_emb[0] != 120:
        return (f"a PixArt-Sigma checkpoint (y_embedder.y_embedding has {y_emb[0]} caption tokens; PixArt-alpha, "
                f"which EasyAnimate v1 is built on, has 120)")
    micro = has(r"^(csize_embedder|ar_embedder)\.|resolution_embedder\.|aspect_ratio_embedder\.")
    if micro:
        return (f"a PixArt model with resolution/aspect-ratio micro-conditions (e.g. '{micro}': PixArt-alpha 1024 "
                f"or PixArt-Sigma); EasyAnimate v1 uses PixArt-XL-2-512x512, which has none")
    return None


def open_weights(path):
    """A CheckpointFile, or a ShardedCheckpoint for a `*.index.json` shard index."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path)
    return CheckpointFile(path)


def find_weights(folder, names, what: str) -> Path:
    """The first of `names` present in `folder` (the order is the preference), else an error listing what is there."""
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise EasyAnimateLoadError(f"{folder}: expected {what} ({', '.join(names)}), found {describe(folder)}")


def validate_shapes(shapes: dict, expected: dict, source, optional=frozenset(),
                    what: str = "the EasyAnimate transformer"):
    """Raise EasyAnimateLoadError summarising missing / unexpected keys and shape mismatches (key + both shapes)
    between a file's `shapes` and the model's `expected` ones; `what` names the model in the message."""
    missing = set(expected) - set(shapes) - set(optional)
    unexpected = set(shapes) - set(expected)
    mismatched = sorted(k for k in set(shapes) & set(expected) if tuple(shapes[k]) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(
            f"{k}: file {list(shapes[k])}, model {list(expected[k])}" for k in mismatched[:5]))
    if missing:
        parts.append(f"{len(missing)} missing keys: {first_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {first_names(unexpected)}")
    raise EasyAnimateLoadError(f"{source}: does not match {what} "
                               f"({len(expected)} keys expected, {len(shapes)} found): " + "; ".join(parts))
