"""Model folders: the registered `easyanimate` folder and the lists the loader combos show (built per call)."""
from __future__ import annotations

import os

import folder_paths

EASYANIMATE_FOLDER = "easyanimate"
PIPELINE_PREFIX = "diffusers/"
TEXT_ENCODER_PREFIX = "text_encoders/"


def register_folders():
    """Add models/easyanimate (after any extra_model_paths.yaml entry) and make it list weight files only."""
    folder_paths.add_model_folder_path(EASYANIMATE_FOLDER, os.path.join(folder_paths.models_dir, EASYANIMATE_FOLDER))
    _, extensions = folder_paths.folder_names_and_paths[EASYANIMATE_FOLDER]
    # a key created by add_model_folder_path has an empty extension set, which lists every file
    if isinstance(extensions, set):
        extensions.update(folder_paths.supported_pt_extensions)


def pipeline_folders(required_subfolder: str = "transformer") -> list[str]:
    """Diffusers pipeline folders (model_index.json + `required_subfolder`) under every models/diffusers path."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for path, dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files and required_subfolder in dirs:
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
                dirs.clear()
    return sorted(set(found))


def pipeline_path(name: str) -> str:
    for root in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    raise FileNotFoundError(f"pipeline folder {name!r} not found under models/diffusers "
                            f"({', '.join(folder_paths.get_folder_paths('diffusers'))})")


def file_list(*folders: str) -> list[str]:
    names = []
    for folder in folders:
        names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def full_path(name: str, *folders: str) -> str:
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(f"model file {name!r} not found in the {' / '.join(folders)} model folders")
