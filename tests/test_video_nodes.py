"""EasyAnimateSaveVideo / EasyAnimatePreviewVideo: files, metadata, errors (in-process with ComfyUI's real
folder_paths and cli args), and the same nodes inside the real server, passing frames on to core video nodes."""
import importlib.util
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_client import REPO_DIR, host_dir

torch = pytest.importorskip("torch")
COMFYUI_DIR = host_dir() / "ComfyUI"
PROMPT = {"5": {"class_type": "EasyAnimateSaveVideo", "inputs": {"fps": 12.0}}}
WORKFLOW = {"nodes": [{"id": 5, "type": "EasyAnimateSaveVideo"}], "note": "a=b;c#d\\e"}


@pytest.fixture(scope="module")
def video_nodes():
    """nodes/nodes_video.py imported against the real ComfyUI tree (appended to sys.path so that the pack's own
    `nodes` package keeps precedence over ComfyUI's nodes.py)."""
    if not (COMFYUI_DIR / "folder_paths.py").exists():
        pytest.skip(f"no ComfyUI tree at {COMFYUI_DIR} (run scripts/setup_host.sh)")
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.append(str(COMFYUI_DIR))
    spec = importlib.util.spec_from_file_location("easyanimate_nodes_video", REPO_DIR / "nodes" / "nodes_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dirs(video_nodes, tmp_path):
    import folder_paths

    saved = folder_paths.get_output_directory(), folder_paths.get_temp_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_temp_directory(str(tmp_path / "temp"))
    yield tmp_path / "output", tmp_path / "temp"
    folder_paths.set_output_directory(saved[0])
    folder_paths.set_temp_directory(saved[1])


def gradient_frames(frames=6, height=31, width=45):
    """A moving colour ramp: every frame differs, so a dropped or repeated frame shows."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    return torch.stack([torch.stack([x, y, torch.full_like(x, i / max(frames - 1, 1))], -1) for i in range(frames)])


def ffmpeg_exe():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def read_mp4(path):
    """(frames uint8 [F,H,W,3], info dict, ffmetadata dict) of an mp4, decoded with imageio-ffmpeg's ffmpeg."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    info = next(reader)
    width, height = info["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    dump = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, check=True).stdout
    metadata = {}
    for line in dump.splitlines()[1:]:
        key, _, value = line.partition("=")
        metadata[key] = value.replace("\\=", "=").replace("\\;", ";").replace("\\#", "#").replace("\\\\", "\\")
    return frames, info, metadata


def save(video_nodes, images, format, quality=85, loop=True, prompt=PROMPT, workflow=WORKFLOW, prefix="EasyAnimate"):
    extra = {"workflow": workflow} if workflow is not None else None
    return video_nodes.EasyAnimateSaveVideo().save(images, prefix, 12.0, format, quality, loop, prompt=prompt,
                                                   extra_pnginfo=extra, unique_id="5")


def test_mp4_is_h264_with_all_frames_padded_to_even_size_and_workflow_metadata(video_nodes, dirs):
    images = gradient_frames(frames=6, height=31, width=45)
    out = save(video_nodes, images, "mp4")
    assert out["result"][0] is images  # frames pass on unchanged to other nodes
    (entry,) = out["ui"]["easyanimate_videos"]
    assert entry == {"filename": "EasyAnimate_00001_.mp4", "subfolder": "", "type": "output",
                     "format": "video/mp4", "fps": 12.0, "frame_count": 6, "width": 46, "height": 32}
    frames, info, metadata = read_mp4(dirs[0] / entry["filename"])
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p") and info["fps"] == 12.0
    assert frames.shape == (6, 32, 46, 3)
    expected = (images.numpy() * 255).round()
    assert np.abs(frames[:, :31, :45].astype(float) - expected).mean() < 6  # lossy, but the same picture
    # the padding repeats the last row (not black)
    assert np.abs(frames[:, 31, :45].astype(float) - frames[:, 30, :45]).mean() < 3
    assert json.loads(metadata["prompt"]) == PROMPT
    assert json.loads(metadata["workflow"]) == WORKFLOW
    assert json.loads(metadata["comment"]) == {"prompt": PROMPT, "workflow": WORKFLOW}
    raw = (dirs[0] / entry["filename"]).read_bytes()
    # prompt/workflow as mdta keys (what the frontend reads from a dropped mp4); index before the frames
    assert b"mdta" in raw and raw.find(b"moov") < raw.find(b"mdat")
    assert sorted(p.name for p in dirs[0].iterdir()) == ["EasyAnimate_00001_.mp4"]  # no partial file left


def test_quality_maps_to_crf_and_changes_mp4_size(video_nodes, dirs):
    assert [video_nodes.quality_to_crf(q) for q in (0, 85, 100)] == [51, 17, 11]
    images = torch.rand(4, 32, 32, 3)
    low = save(video_nodes, images, "mp4", quality=10)["ui"]["easyanimate_videos"][0]["filename"]
    high = save(video_nodes, images, "mp4", quality=100)["ui"]["easyanimate_videos"][0]["filename"]
    assert (low, high) == ("EasyAnimate_00001_.mp4", "EasyAnimate_00002_.mp4")  # the usual counter
    assert (dirs[0] / high).stat().st_size > 2 * (dirs[0] / low).stat().st_size


@pytest.mark.parametrize("loop", [True, False])
def test_gif_frames_timing_loop_and_comment(video_nodes, dirs, loop):
    images = gradient_frames(frames=5, height=20, width=30)
    (entry,) = save(video_nodes, images, "gif", loop=loop, prefix="clips/gif")["ui"]["easyanimate_videos"]
    assert (entry["subfolder"], entry["format"], entry["frame_count"]) == ("clips", "image/gif", 5)
    with Image.open(dirs[0] / "clips" / entry["filename"]) as gif:
        assert (gif.n_frames, gif.size) == (5, (30, 20))
        assert gif.info["duration"] in (80, 83, 90)  # 1000/12 ms in GIF's 10 ms units
        assert ("loop" in gif.info) == loop and gif.info.get("loop", 0) == 0
        assert json.loads(gif.info["comment"]) == {"prompt": PROMPT, "workflow": WORKFLOW}
        gif.seek(4)
        last = np.asarray(gif.convert("RGB"), dtype=float)
    assert np.abs(last - images[4].numpy() * 255).mean() < 12  # 256-colour palette


@pytest.mark.parametrize("loop", [True, False])
def test_webp_frames_loop_and_exif_like_core(video_nodes, dirs, loop):
    images = gradient_frames(frames=4, height=24, width=40)
    (entry,) = save(video_nodes, images, "webp", quality=90, loop=loop)["ui"]["easyanimate_videos"]
    with Image.open(dirs[0] / entry["filename"]) as webp:
        assert (webp.n_frames, webp.size, webp.info["loop"]) == (4, (40, 24), 0 if loop else 1)
        exif = webp.getexif()
        webp.seek(3)
        last = np.asarray(webp.convert("RGB"), dtype=float)
        assert webp.info["duration"] == 83  # per frame, known once a frame is read
    # the tags and "key:json" form of core SaveAnimatedWEBP, which the frontend reads when a file is dropped
    assert exif[0x0110] == "prompt:" + json.dumps(PROMPT)
    assert exif[0x010F] == "workflow:" + json.dumps(WORKFLOW)
    assert np.abs(last - images[3].numpy() * 255).mean() < 6


def test_disable_metadata_flag_is_honoured(video_nodes, dirs):
    from comfy.cli_args import args

    args.disable_metadata = True
    try:
        mp4 = save(video_nodes, torch.rand(2, 16, 16, 3), "mp4")["ui"]["easyanimate_videos"][0]["filename"]
        gif = save(video_nodes, torch.rand(2, 16, 16, 3), "gif")["ui"]["easyanimate_videos"][0]["filename"]
        webp = save(video_nodes, torch.rand(2, 16, 16, 3), "webp")["ui"]["easyanimate_videos"][0]["filename"]
    finally:
        args.disable_metadata = False
    assert not {"prompt", "workflow", "comment"} & set(read_mp4(dirs[0] / mp4)[2])
    with Image.open(dirs[0] / gif) as im:
        assert "comment" not in im.info
    with Image.open(dirs[0] / webp) as im:
        assert 0x0110 not in im.getexif() and 0x010F not in im.getexif()


def test_preview_goes_to_temp_folder(video_nodes, dirs):
    images = torch.rand(3, 16, 24, 3)
    out = video_nodes.EasyAnimatePreviewVideo().preview(images, 8.0, "webp", unique_id="9")
    (entry,) = out["ui"]["easyanimate_videos"]
    assert out["result"][0] is images
    assert entry["type"] == "temp" and entry["filename"].startswith("EasyAnimatePreview_")
    assert (dirs[1] / entry["filename"]).is_file() and not dirs[0].exists()
    with Image.open(dirs[1] / entry["filename"]) as webp:
        webp.seek(1)
        webp.load()
        assert (webp.n_frames, webp.info["duration"]) == (3, 125)


@pytest.mark.parametrize("images, fps, format, message", [
    (torch.zeros(0, 16, 16, 3), 12.0, "mp4", "empty batch (0 frames)"),
    (torch.zeros(16, 16, 3), 12.0, "mp4", "got shape (16, 16, 3)"),
    (torch.zeros(2, 16, 16, 2), 12.0, "gif", "got shape (2, 16, 16, 2)"),
    (torch.zeros(2, 16, 16, 3), 0.0, "webp", "fps must be > 0; got 0.0"),
    (torch.zeros(2, 16, 16, 3), 12.0, "avi", "format must be one of ['gif', 'mp4', 'webp']; got 'avi'"),
])
def test_bad_input_gives_clear_error_and_writes_nothing(video_nodes, dirs, images, fps, format, message):
    with pytest.raises(ValueError) as e:
        video_nodes.EasyAnimateSaveVideo().save(images, "EasyAnimate", fps, format, 85, True, unique_id="5")
    assert "EasyAnimateSaveVideo (node 5)" in str(e.value) and message in str(e.value)
    assert not dirs[0].exists() or not any(dirs[0].iterdir())


def test_failed_write_leaves_no_partial_file(video_nodes, dirs, monkeypatch):
    def broken_writer(path, *args):
        open(path, "wb").write(b"half a gif")
        raise OSError("disk full")

    monkeypatch.setattr(video_nodes, "write_gif", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save(video_nodes, torch.rand(2, 8, 8, 3), "gif")
    assert list(dirs[0].iterdir()) == []


def test_leftover_partial_files_are_removed_unless_their_writer_is_alive(video_nodes, dirs):
    import os

    dirs[0].mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now
    stale = [dirs[0] / ".EasyAnimate_00001_.gif.partial",  # the name before the owner was added
             dirs[0] / f".EasyAnimate_00002_.mp4.{dead.pid}-1.partial"]
    live = dirs[0] / f".other_00001_.webp.{video_nodes._OWNER}.partial"  # a save running in this process
    for path in stale + [live]:
        path.write_bytes(b"half a video")
    save(video_nodes, torch.rand(2, 8, 8, 3), "gif")
    assert sorted(p.name for p in dirs[0].iterdir()) == sorted([live.name, "EasyAnimate_00001_.gif"])
    # at load the whole output and temp trees are cleaned (a crash may have left them in subfolders)
    (dirs[0] / "sub").mkdir()
    (dirs[0] / "sub" / stale[1].name).write_bytes(b"x")
    dirs[1].mkdir(parents=True, exist_ok=True)
    (dirs[1] / stale[0].name).write_bytes(b"x")
    video_nodes.remove_stale_partials_at_load()
    assert not any(p.name.endswith(".partial") and p != live for p in dirs[0].rglob("*"))
    assert os.listdir(dirs[1]) == []


# ---- in the real server -----------------------------------------------------------------------------------
def solid_frames_prompt(save_node, width=34, height=26, frames=5):
    """Core EmptyImage frames -> our save node -> core CreateVideo + SaveVideo (frames handed on)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": frames,
                                                      "color": 0x3366CC}},
        "2": save_node,
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 12.0}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "core/handed_on",
                                                    "format": "mp4", "codec": "h264"}},
    }


def test_server_save_node_serves_video_and_hands_frames_to_core_nodes(comfy):
    save_node = {"class_type": "EasyAnimateSaveVideo", "inputs": {
        "images": ["1", 0], "filename_prefix": "server/EasyAnimate", "fps": 12.0, "format": "mp4", "quality": 85,
        "loop": True}}
    result = comfy.queue(solid_frames_prompt(save_node))
    assert result.status_str == "success", result.error
    (entry,) = result.outputs["2"]["easyanimate_videos"]
    assert (entry["type"], entry["subfolder"], entry["frame_count"], entry["width"], entry["height"]) == \
        ("output", "server", 5, 34, 26)
    query = f"filename={entry['filename']}&subfolder=server&type=output"
    with urllib.request.urlopen(f"{comfy.url}/view?{query}", timeout=30) as r:
        assert r.headers["Content-Type"] == "video/mp4"
        served = r.read()
    path = comfy.output_dir / "server" / entry["filename"]
    assert served == path.read_bytes()
    frames, _, metadata = read_mp4(path)
    assert frames.shape == (5, 26, 34, 3)
    assert np.abs(frames.reshape(-1, 3).mean(0) - [0x33, 0x66, 0xCC]).max() < 3
    assert json.loads(metadata["prompt"])["2"]["class_type"] == "EasyAnimateSaveVideo"
    # core SaveVideo got our frames
    (core,) = result.outputs["4"]["images"]
    assert core["subfolder"] == "core" and (comfy.output_dir / "core" / core["filename"]).is_file()


def test_server_preview_node_writes_to_temp(comfy):
    preview = {"class_type": "EasyAnimatePreviewVideo", "inputs": {"images": ["1", 0], "fps": 6.0,
                                                                   "format": "gif"}}
    prompt = solid_frames_prompt(preview, width=20, height=20, frames=3)
    result = comfy.queue({k: prompt[k] for k in ("1", "2")})
    assert result.status_str == "success", result.error
    (entry,) = result.outputs["2"]["easyanimate_videos"]
    assert entry["type"] == "temp"
    with Image.open(comfy.temp_dir / entry["filename"]) as gif:
        # identical frames (a solid colour) are merged by the GIF encoder; the playing time stays 3 / 6 fps
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    assert abs(sum(durations) - 500) <= 30, durations
    assert comfy.view(entry["filename"], "", "temp")[:6] == b"GIF89a"


def test_server_rejects_out_of_range_fps_before_running(comfy):
    from comfy_client import PromptRejected

    save_node = {"class_type": "EasyAnimateSaveVideo", "inputs": {
        "images": ["1", 0], "filename_prefix": "x", "fps": 0.0, "format": "gif", "quality": 85, "loop": True}}
    prompt = solid_frames_prompt(save_node)
    with pytest.raises(PromptRejected) as e:
        comfy.queue({k: prompt[k] for k in ("1", "2")})
    assert "fps" in json.dumps(e.value.body["node_errors"])
