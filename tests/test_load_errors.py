"""Every library loader fails on a bad file with an EasyAnimateLoadError that names the file and says what was
expected and what was found (no OSError / SafetensorError / RuntimeError from a lower layer), and no pickle code
runs. The files are the tiny release set (easyanimate_model/tiny.py), damaged one at a time."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import easyanimate_model as ea
from easyanimate_model.errors import EasyAnimateLoadError
from easyanimate_model.loading import read_motion_module
from easyanimate_model.text import load_text_encoder
from easyanimate_model.tiny import TINY_CONFIG, write_release_files
from easyanimate_model.vae import load_vae

VAE_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release_files(tmp_path_factory.mktemp("models"))


@pytest.fixture
def pipeline(release, tmp_path):
    """A fresh copy of the tiny pipeline folder, free to damage."""
    return shutil.copytree(release["pipeline"], tmp_path / "PixArt-XL-2-512x512")


def truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class RunsCode:
    """A pickle payload: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_code_pickle(path, marker):
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(marker)}, path)


def test_the_error_is_exported_from_the_package_and_is_a_value_error():
    assert ea.EasyAnimateLoadError is EasyAnimateLoadError and issubclass(EasyAnimateLoadError, ValueError)


def test_truncated_vae_file(pipeline):
    path = pipeline / "vae" / VAE_FILE
    truncate(path)
    for source in (pipeline, pipeline / "vae", path):
        with pytest.raises(EasyAnimateLoadError) as e:
            load_vae(source)
        assert str(path) in str(e.value) and "truncated" in str(e.value)


def test_truncated_t5_shard(pipeline):
    index = json.loads((pipeline / "text_encoder" / "model.safetensors.index.json").read_text())
    shard = pipeline / "text_encoder" / sorted(set(index["weight_map"].values()))[-1]
    truncate(shard)
    with pytest.raises(EasyAnimateLoadError) as e:
        load_text_encoder(pipeline)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)


@pytest.mark.parametrize("folder, remove, name, loader", [
    ("vae", VAE_FILE, "diffusion_pytorch_model.bin", load_vae),
    ("text_encoder", "model*", "pytorch_model.bin", load_text_encoder),
])
def test_pickle_with_code_is_refused_and_never_runs(pipeline, tmp_path, folder, remove, name, loader):
    marker = tmp_path / "pickle_code_ran"
    for f in (pipeline / folder).glob(remove):
        f.unlink()
    path = pipeline / folder / name
    write_code_pickle(path, marker)
    with pytest.raises(EasyAnimateLoadError, match="not loaded for safety") as e:
        loader(pipeline)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_sharded_pickle_t5_folder_loads(pipeline, release):
    """pytorch_model.bin.index.json (sharded pickles, weights only) is one of the T5 folder variants."""
    encoder_dir = pipeline / "text_encoder"
    index = json.loads((encoder_dir / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(str(encoder_dir / shard)), encoder_dir / name)
        weight_map.update({k: name for k, v in index["weight_map"].items() if v == shard})
        (encoder_dir / shard).unlink()
    (encoder_dir / "model.safetensors.index.json").unlink()
    (encoder_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, encoder = load_text_encoder(pipeline)
    _, reference = load_text_encoder(release["pipeline"])
    assert torch.equal(encoder.shared.weight, reference.shared.weight)


def reshape_one(path, key_part):
    state = load_file(str(path))
    key = next(k for k in sorted(state) if key_part in k)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:], dtype=state[key].dtype)
    save_file(state, str(path))
    return key


def test_wrong_shape_in_vae(pipeline):
    path = pipeline / "vae" / VAE_FILE
    key = reshape_one(path, "decoder.conv_out.weight")
    with pytest.raises(EasyAnimateLoadError) as e:
        load_vae(pipeline)
    message = str(e.value)
    assert str(path) in message and key in message and "shape mismatch" in message
    assert "file [" in message and "model [" in message


def test_wrong_shape_in_t5_shard(pipeline):
    encoder_dir = pipeline / "text_encoder"
    index = json.loads((encoder_dir / "model.safetensors.index.json").read_text())
    key = "encoder.final_layer_norm.weight"
    reshape_one(encoder_dir / index["weight_map"][key], key)
    with pytest.raises(EasyAnimateLoadError) as e:
        load_text_encoder(pipeline)
    message = str(e.value)
    assert "model.safetensors.index.json" in message and key in message and "shape mismatch" in message


def test_wrong_shape_in_motion_module(release, tmp_path):
    path = tmp_path / "mm.safetensors"
    shutil.copy(release["motion_module"], path)
    key = reshape_one(path, "proj_in.weight")
    with pytest.raises(EasyAnimateLoadError) as e:
        read_motion_module(path, TINY_CONFIG)
    assert str(path) in str(e.value) and key in str(e.value) and "motion module" in str(e.value)
    with pytest.raises(EasyAnimateLoadError, match=str(path)):
        ea.load_transformer(release["pipeline"], motion_module=path)


def test_not_a_vae_and_not_a_t5(release, pipeline):
    with pytest.raises(EasyAnimateLoadError, match="expected an SD VAE state dict"):
        load_vae(release["motion_module"])
    (pipeline / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(EasyAnimateLoadError, match=r"config\.json: expected the T5 encoder config\.json"):
        load_text_encoder(pipeline)


def training_args(release, mode, transformer_path=None, motion_module_path=None):
    from types import SimpleNamespace

    return SimpleNamespace(pretrained_model_name_or_path=str(release["pipeline"]), video=mode != "t2i",
                           transformer_path=transformer_path and str(transformer_path),
                           motion_module_path=motion_module_path and str(motion_module_path))


def test_training_loads_checkpoints_with_the_library_loader(release, tmp_path):
    from easyanimate_model.train.loop import build_transformer

    # a 3D checkpoint given to a 2D (t2i) run: an error naming the motion-module keys, not a silent partial load
    full = tmp_path / "full3d.safetensors"
    save_file({**load_file(str(release["transformer"] / VAE_FILE)), **load_file(str(release["motion_module"]))},
              str(full))
    with pytest.raises(EasyAnimateLoadError, match=r"unexpected keys: transformer_blocks\.0\.attn_temporal") as e:
        build_transformer(training_args(release, "t2i", transformer_path=full))
    assert str(full) in str(e.value)
    # the video LoRA recipe: the motion-module file as --transformer_path
    model = build_transformer(training_args(release, "video_lora", transformer_path=release["motion_module"]))
    reference = ea.load_transformer(release["pipeline"], motion_module=release["motion_module"])
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(EasyAnimateLoadError, match="give only one"):
        build_transformer(training_args(release, "motion", transformer_path=release["motion_module"],
                                        motion_module_path=release["motion_module"]))
    # the portrait checkpoint over the 2D model
    model = build_transformer(training_args(release, "t2i", transformer_path=release["portrait"]))
    portrait = load_file(str(release["portrait"]))
    assert model.config.motion_module is None
    assert all(torch.equal(v, portrait[k]) for k, v in model.state_dict().items())
