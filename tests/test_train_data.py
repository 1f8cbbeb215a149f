"""Training data (docs/MODEL.md §D.3/§D.4): metadata formats, frame indices, buckets, crops, skipped rows/media."""
import csv
import json

import numpy as np
import pytest
import torch

from easyanimate_model.train import data as D

imageio = pytest.importorskip("imageio.v3")


def write_clip(path, frames=12, height=64, width=64, seed=0):
    rng = np.random.default_rng(seed)
    video = (rng.random((frames, height, width, 3)) * 255).astype(np.uint8)
    # frame index encoded in the red channel of a corner block, to check which frames were read
    for i in range(frames):
        video[i, :16, :16] = (i * 20, 0, 0)
    imageio.imwrite(path, video, plugin="pyav", codec="libx264", fps=8)
    return path


def write_image(path, height=48, width=64, seed=0):
    rng = np.random.default_rng(seed)
    imageio.imwrite(path, (rng.random((height, width, 3)) * 255).astype(np.uint8))
    return path


def test_aspect_ratio_tables_match_the_spec():
    assert len(D.ASPECT_RATIO_512) == 40 and len(D.ASPECT_RATIO_RANDOM_CROP_512) == 15
    assert D.ASPECT_RATIO_512["0.25"] == (256, 1024) and D.ASPECT_RATIO_512["4.0"] == (1024, 256)
    for key, hw in {"0.57": (384, 672), "0.78": (448, 576), "1.0": (512, 512), "1.29": (576, 448),
                    "1.75": (672, 384)}.items():
        assert D.ASPECT_RATIO_512[key] == hw
    assert sum(D.ASPECT_RATIO_RANDOM_CROP_PROB) == 62 and set(D.ASPECT_RATIO_RANDOM_CROP_512) <= set(D.ASPECT_RATIO_512)


def test_scaled_buckets_and_closest_bucket():
    buckets = D.scaled_table(D.ASPECT_RATIO_512, 256, 16)
    assert buckets["1.0"] == (256, 256) and buckets["0.25"] == (128, 512) and buckets["0.94"] == (240, 256)
    # the motion module needs multiples of 32: 240 floors to 224
    assert D.scaled_table(D.ASPECT_RATIO_512, 256, 32)["0.94"] == (224, 256)
    assert D.closest_bucket(360, 640, D.ASPECT_RATIO_512) == "0.57"
    assert D.closest_bucket(640, 360, D.ASPECT_RATIO_512) == "1.75"
    assert D.closest_bucket(100, 100, D.ASPECT_RATIO_512) == "1.0"


@pytest.mark.parametrize("hw,target,expected", [
    ((360, 640), (384, 672), (384, 682)),  # height limits: 640 * 384 / 360 = 682.7
    ((640, 360), (512, 512), (910, 512)),
    ((48, 64), (64, 64), (64, 85)),
    ((64, 64), (64, 64), (64, 64)),
])
def test_cover_size_and_resize_crop(hw, target, expected):
    assert D.cover_size(*hw, *target) == expected
    out = D.resize_crop(torch.rand(2, 3, *hw), *target)
    assert out.shape == (2, 3, *target)


def test_center_crop_is_centered():
    x = torch.zeros(1, 1, 4, 8)
    x[..., 2:6] = 1.0  # the central 4 columns
    assert torch.equal(D.resize_crop(x, 4, 4), torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("num_frames,n,stride", [(12, 4, 2), (100, 16, 2), (12, 16, 1), (5, 3, 4), (1, 4, 2)])
def test_frame_indices_follow_the_spec_formula(num_frames, n, stride):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        idx = D.frame_indices(num_frames, n, stride, rng)
        clip = min(num_frames, (n - 1) * stride + 1)
        start = int(idx[0])
        assert 0 <= start <= num_frames - clip
        assert np.array_equal(idx, np.linspace(start, start + clip - 1, n).astype(int))
        assert idx[-1] == start + clip - 1 and len(idx) == n


def test_random_frame_crop_choices():
    rng = np.random.default_rng(0)
    draws = [D.random_frame_crop_length(12, rng) for _ in range(3000)]
    counts = {k: draws.count(k) for k in (4, 8, 12)}
    assert set(draws) == {4, 8, 12}
    # p ~ k: 4/24, 8/24, 12/24
    assert abs(counts[12] / 3000 - 0.5) < 0.05 and abs(counts[4] / 3000 - 1 / 6) < 0.04
    assert D.random_frame_crop_length(3, rng) == 3


def test_random_ratio_crop_sizes_are_multiples_of_16(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "meta.json").write_text(json.dumps([{"file_path": "a.png", "text": "x", "type": "image"}]))
    samples = D.read_metadata(str(tmp_path), str(tmp_path / "meta.json"))
    cfg = D.DataConfig(sample_size=256, n_frames=1, enable_bucket=True, random_ratio_crop=True)
    planner = D.BatchPlanner(samples, cfg, 1, 0, D.SkipLog())
    allowed = set(D.scaled_table(D.ASPECT_RATIO_RANDOM_CROP_512, 256, 16).values())
    seen = set()
    for i in range(40):
        batch = planner.load(0, i, [0])
        h, w = batch["pixel_values"].shape[-2:]
        assert h % 16 == 0 and w % 16 == 0 and (h, w) in allowed
        seen.add((h, w))
    assert len(seen) > 3


def test_video_batch_reads_the_sampled_frames(tmp_path):
    write_clip(tmp_path / "v.mp4")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"file_path": "v.mp4", "text": "a clip", "type": "video"}]))
    samples = D.read_metadata(str(tmp_path), str(meta))
    cfg = D.DataConfig(sample_size=32, n_frames=4, stride=3, flip=False)
    planner = D.BatchPlanner(samples, cfg, 1, 7, D.SkipLog())
    batch = planner.load(0, 0, [0])
    px = batch["pixel_values"]
    assert px.shape == (1, 4, 3, 32, 32) and px.min() >= -1 and px.max() <= 1
    assert batch["text"] == ["a clip"] and batch["type"] == "video"
    # 12 frames, n=4, stride 3 -> clip of 10 frames; the red corner value tells which frame was read
    expected = D.frame_indices(12, 4, 3, np.random.default_rng([7, 0, 0]))
    red = ((px[0, :, 0, 0, 0] + 1) / 2 * 255 / 20).round().long().tolist()
    assert red == expected.tolist()


def test_formats_webvid_json_imagefolder_and_skips(tmp_path):
    for i in range(3):
        write_clip(tmp_path / f"{i}.mp4", seed=i)
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 100)
    with open(tmp_path / "webvid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "name", "page_dir"])
        w.writerows([[0, "zero", "p"], [1, "one", "p"], [2, "", "p"], ["missing", "gone", "p"], ["corrupt", "bad", "p"]])
    skips = D.SkipLog()
    samples = D.read_metadata(str(tmp_path), str(tmp_path / "webvid.csv"), skips=skips)
    assert [s.text for s in samples] == ["zero", "one", "gone", "bad"] and all(s.type == "video" for s in samples)
    assert skips.counts() == {"missing column": 1}

    cfg = D.DataConfig(sample_size=32, n_frames=4, stride=1)
    planner = D.BatchPlanner(samples, cfg, 4, 0, skips)
    (batch,) = list(D.epoch_loader(planner, 0))
    assert batch["pixel_values"].shape[0] == 2 and sorted(batch["text"]) == ["one", "zero"]
    for item, reason in batch["skipped"]:
        skips.add(item, reason)
    assert skips.counts() == {"missing column": 1, "missing file": 1, "unreadable": 1}
    assert "3 samples skipped" in skips.summary()

    # imagefolder metadata.jsonl, read without HF datasets
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "an image"}\n{"text": "no file"}\n')
    skips = D.SkipLog()
    samples = D.read_metadata(str(folder), None, skips=skips)
    assert [(s.text, s.type) for s in samples] == [("an image", "image")] and len(skips) == 1


def test_bad_dataset_paths_and_columns_raise(tmp_path):
    with pytest.raises(D.DatasetError, match="expected a directory"):
        D.read_metadata(str(tmp_path / "nope"), None)
    with pytest.raises(D.DatasetError, match="metadata.jsonl"):
        D.read_metadata(str(tmp_path), None)
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    with pytest.raises(D.DatasetError, match="videoid,name,page_dir"):
        D.read_metadata(str(tmp_path), str(tmp_path / "m.csv"))
    (tmp_path / "m.json").write_text('{"file_path": "x"}')
    with pytest.raises(D.DatasetError, match="JSON list"):
        D.read_metadata(str(tmp_path), str(tmp_path / "m.json"))
    (tmp_path / "m.json").write_text('[{"text": "no path"}]')
    with pytest.raises(D.DatasetError, match="no usable rows"):
        D.read_metadata(str(tmp_path), str(tmp_path / "m.json"))


def test_mixed_batches_are_homogeneous_and_bucketed(tmp_path):
    rows = []
    for i in range(4):
        write_clip(tmp_path / f"v{i}.mp4", seed=i, height=64, width=96)
        rows.append({"file_path": f"v{i}.mp4", "text": f"video {i}", "type": "video"})
        write_image(tmp_path / f"i{i}.png", height=96 if i % 2 else 48, width=64, seed=i)
        rows.append({"file_path": f"i{i}.png", "text": f"image {i}", "type": "image"})
    (tmp_path / "meta.json").write_text(json.dumps(rows))
    samples = D.read_metadata(str(tmp_path), str(tmp_path / "meta.json"))
    cfg = D.DataConfig(sample_size=64, n_frames=4, stride=1, enable_bucket=True, size_multiple=32)
    planner = D.BatchPlanner(samples, cfg, 2, 3, D.SkipLog())
    plan = planner.plan(0)
    assert plan == planner.plan(0)  # the plan depends on (seed, epoch) only
    kinds = set()
    for i, indices in enumerate(plan):
        types = {samples[j].type for j in indices}
        assert len(types) == 1
        batch = planner.load(0, i, indices)
        f = batch["pixel_values"].shape[1]
        kinds.add((batch["type"], f))
        h, w = batch["pixel_values"].shape[-2:]
        assert h % 32 == 0 and w % 32 == 0
        assert (f == 1) == (batch["type"] == "image")
    assert {k for k, _ in kinds} == {"video", "image"}
    # 64x96 videos -> ratio 0.67 -> bucket 0.68 scaled to 64 px and floored to 32: (32, 64)
    video_batches = [planner.load(0, i, ix)["pixel_values"] for i, ix in enumerate(plan)
                     if samples[ix[0]].type == "video"]
    assert all(v.shape[-2:] == (32, 64) for v in video_batches)
