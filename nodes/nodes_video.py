"""Video output nodes: IMAGE frames -> mp4 (H.264), gif or animated webp, with an in-node preview.

The UI output key is `easyanimate_videos` (read by web/js/easyanimate_video.js); the frontend's own image/video
preview ignores it, so the video is shown once. The frames are passed on unchanged so VHS or core
CreateVideo/SaveVideo can take over.
"""
import json
import logging
import os
import random
import re
import subprocess
import tempfile

import numpy as np
import psutil
from PIL import Image

import folder_paths
from comfy.cli_args import args

FORMATS = {  # format -> (file extension, MIME type for the preview element)
    "mp4": ("mp4", "video/mp4"),
    "gif": ("gif", "image/gif"),
    "webp": ("webp", "image/webp"),
}
UI_KEY = "easyanimate_videos"
log = logging.getLogger("EasyAnimate")

# Files being written are named `.<name>.<pid>-<process start>.partial` and renamed once complete; a crash leaves them
# behind. They are removed when no live process owns them: at load, and in a folder before each save (a failed
# save removes its own).
_OWNER = f"{os.getpid()}-{int(psutil.Process().create_time())}"
_PARTIAL = re.compile(r"\..+?(?:\.(\d+)-(\d+))?\.partial")


def _owner_alive(pid, start):
    try:
        return pid is not None and int(psutil.Process(int(pid)).create_time()) == int(start)
    except (psutil.Error, ValueError):
        return False


def remove_stale_partials(folder, recursive=False):
    """Remove the .partial files in `folder` whose writer is gone; returns how many."""
    removed = 0
    for root, _, files in os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]:
        for name in files:
            match = _PARTIAL.fullmatch(name)
            if match and not _owner_alive(*match.groups()):
                try:
                    os.remove(os.path.join(root, name))
                    removed += 1
                except OSError:
                    pass  # gone already, or not ours to remove
    return removed


def remove_stale_partials_at_load():
    for folder in (folder_paths.get_output_directory(), folder_paths.get_temp_directory()):
        if os.path.isdir(folder):
            removed = remove_stale_partials(folder, recursive=True)
            if removed:
                log.info("EasyAnimate: removed %d unfinished video file(s) (*.partial) in %s", removed, folder)


def quality_to_crf(quality):
    """One "higher is better" 0..100 scale for all formats; 0..100 maps onto H.264 CRF 51..11.

    CRF 0 (lossless) is avoided on purpose: it needs the High 4:4:4 profile, which browsers cannot play.
    """
    return round(51 - 0.4 * quality)


def frames_to_uint8(images, node):
    """IMAGE [F,H,W,C] floats in 0..1 -> uint8 RGB array [F,H,W,3], with a clear error for bad input."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] not in (3, 4):
        raise ValueError(f"{node}: images must be an IMAGE batch [frames, height, width, 3]; got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{node}: images is an empty batch (0 frames); connect the decoded video frames")
    array = images.detach().float().cpu().numpy()[..., :3]
    return np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)


def comfy_metadata(prompt, extra_pnginfo):
    """{"prompt": ..., "workflow": ...} as ComfyUI embeds it; empty with --disable-metadata."""
    if args.disable_metadata:
        return {}
    metadata = dict(extra_pnginfo or {})
    if prompt is not None:
        metadata["prompt"] = prompt
    return metadata


def _escape_ffmetadata(text):
    for char in "\\=;#\n":
        text = text.replace(char, "\\" + char)
    return text


def write_mp4(path, frames, fps, quality, metadata):
    """H.264 yuv420p through imageio-ffmpeg's ffmpeg binary.

    Metadata goes through an ffmetadata file (no command-line length limit): `comment` holds the whole JSON for
    generic tools, `prompt`/`workflow` keys (mdta, like core SaveVideo) let ComfyUI load the workflow from the file.
    """
    import imageio_ffmpeg

    _, height, width, _ = frames.shape
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    movflags = "+faststart"  # index first: the preview starts playing before the whole file is loaded
    with tempfile.TemporaryDirectory() as tmp:
        if metadata:
            meta_path = os.path.join(tmp, "metadata.txt")
            entries = {"comment": json.dumps(metadata)}
            entries.update((key, json.dumps(value)) for key, value in metadata.items())
            with open(meta_path, "w", encoding="utf-8") as f:
                f.write(";FFMETADATA1\n")
                f.writelines(f"{_escape_ffmetadata(k)}={_escape_ffmetadata(v)}\n" for k, v in entries.items())
            command += ["-f", "ffmetadata", "-i", meta_path, "-map_metadata", "1"]
            movflags += "+use_metadata_tags"  # keeps keys other than the standard ones (prompt, workflow)
        command += ["-map", "0:v", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(quality_to_crf(quality)),
                    "-movflags", movflags, "-f", "mp4", path]
        result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {result.stderr.decode(errors='replace').strip()}")


def write_gif(path, frames, fps, loop, metadata):
    images = [Image.fromarray(frame) for frame in frames]
    options = {"loop": 0} if loop else {}  # no loop key = play once
    if metadata:
        options["comment"] = json.dumps(metadata)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps,
                   disposal=1, optimize=False, **options)


def write_webp(path, frames, fps, quality, loop, metadata):
    images = [Image.fromarray(frame) for frame in frames]
    exif = images[0].getexif()
    # The tags core SaveAnimatedWEBP uses, which the ComfyUI frontend reads back when a webp is dropped on it.
    if "prompt" in metadata:
        exif[0x0110] = "prompt:" + json.dumps(metadata["prompt"])
    tag = 0x010F
    for key, value in metadata.items():
        if key != "prompt":
            exif[tag] = f"{key}:{json.dumps(value)}"
            tag -= 1
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000.0 / fps),
                   loop=0 if loop else 1, quality=quality, method=4, exif=exif)


def save_video(images, fps, format, quality, loop, folder, folder_type, filename_prefix, metadata, node):
    """Write the frames as one video file into `folder`; returns the UI entry. Never leaves a half-written file."""
    if format not in FORMATS:
        raise ValueError(f"{node}: format must be one of {sorted(FORMATS)}; got {format!r}")
    if not fps > 0:
        raise ValueError(f"{node}: fps must be > 0; got {fps}")
    frames = frames_to_uint8(images, node)
    if format == "mp4":
        # yuv420p needs even sizes: pad an odd width/height by repeating the last row/column.
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    frame_count, height, width, _ = frames.shape
    extension, mime = FORMATS[format]
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        filename_prefix, folder, width, height)
    while os.path.exists(os.path.join(full_folder, f"{filename}_{counter:05}_.{extension}")):
        counter += 1
    file = f"{filename}_{counter:05}_.{extension}"
    final_path = os.path.join(full_folder, file)
    # A hidden partial name that the filename counter never matches; renamed once complete.
    partial_path = os.path.join(full_folder, f".{file}.{_OWNER}.partial")
    remove_stale_partials(full_folder)
    try:
        if format == "mp4":
            write_mp4(partial_path, frames, fps, quality, metadata)
        elif format == "gif":
            write_gif(partial_path, frames, fps, loop, metadata)
        else:
            write_webp(partial_path, frames, fps, quality, loop, metadata)
        os.replace(partial_path, final_path)
    finally:
        if os.path.exists(partial_path):
            os.remove(partial_path)
    return {"filename": file, "subfolder": subfolder, "type": folder_type, "format": mime, "fps": fps,
            "frame_count": frame_count, "width": width, "height": height}


def _node_name(cls_name, unique_id):
    return f"{cls_name} (node {unique_id})" if unique_id is not None else cls_name


FPS_INPUT = ("FLOAT", {"default": 12.0, "min": 0.1, "max": 240.0, "step": 0.1,
                       "tooltip": "Frames per second (EasyAnimate v1 was trained at 12)."})
FORMAT_INPUT = (list(FORMATS), {"default": "mp4", "tooltip": (
    "mp4 = H.264 (odd sizes padded to even); gif; animated webp (gif/webp merge identical consecutive frames, "
    "keeping the playing time).")})


class EasyAnimateSaveVideo:
    """Saves frames as a video in the output folder and previews it in the node."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames [frames, height, width, 3]."}),
                "filename_prefix": ("STRING", {"default": "EasyAnimate", "tooltip": (
                    "File name prefix; may contain a subfolder and %width%/%height%/%date% fields, like SaveImage.")}),
                "fps": FPS_INPUT,
                "format": FORMAT_INPUT,
                "quality": ("INT", {"default": 85, "min": 0, "max": 100, "step": 1, "tooltip": (
                    "Higher is better. webp: its quality; mp4: CRF = 51 - 0.4 x quality (85 -> CRF 17); "
                    "gif: unused.")}),
                "loop": ("BOOLEAN", {"default": True, "tooltip": "gif/webp: loop forever (off = play once)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The input frames, unchanged, for other video nodes.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "EasyAnimate/video"
    DESCRIPTION = ("Saves the frames as mp4/gif/webp in the ComfyUI output folder, with the prompt and workflow "
                   "embedded (unless --disable-metadata), and plays it in the node.")

    def save(self, images, filename_prefix, fps, format, quality, loop, prompt=None, extra_pnginfo=None,
             unique_id=None):
        entry = save_video(images, fps, format, quality, loop, folder_paths.get_output_directory(), "output",
                           filename_prefix, comfy_metadata(prompt, extra_pnginfo),
                           _node_name(type(self).__name__, unique_id))
        return {"ui": {UI_KEY: [entry]}, "result": (images,)}


class EasyAnimatePreviewVideo:
    """Like EasyAnimateSaveVideo, into the temp folder (cleared when ComfyUI restarts), without metadata."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames [frames, height, width, 3]."}),
                "fps": FPS_INPUT,
                "format": FORMAT_INPUT,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The input frames, unchanged, for other video nodes.",)
    FUNCTION = "preview"
    OUTPUT_NODE = True
    CATEGORY = "EasyAnimate/video"
    DESCRIPTION = "Plays the frames in the node; the file goes to the temp folder, not the output folder."

    def preview(self, images, fps, format, unique_id=None):
        prefix = "EasyAnimatePreview_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        entry = save_video(images, fps, format, 85, True, folder_paths.get_temp_directory(), "temp", prefix, {},
                           _node_name(type(self).__name__, unique_id))
        return {"ui": {UI_KEY: [entry]}, "result": (images,)}


remove_stale_partials_at_load()

NODE_CLASS_MAPPINGS = {
    "EasyAnimateSaveVideo": EasyAnimateSaveVideo,
    "EasyAnimatePreviewVideo": EasyAnimatePreviewVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateSaveVideo": "EasyAnimate Save Video",
    "EasyAnimatePreviewVideo": "EasyAnimate Preview Video",
}
