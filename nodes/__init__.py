"""ComfyUI glue: the node classes of every nodes_*.py, merged. nodes_video.py (save/preview) joins when present."""
import importlib
import os

from .model_files import register_folders

register_folders()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_MODULES = ["nodes_loaders", "nodes_lora", "nodes_text", "nodes_latent", "nodes_sampler", "nodes_vae"]
if os.path.isfile(os.path.join(os.path.dirname(__file__), "nodes_video.py")):
    _MODULES.append("nodes_video")

for _name in _MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
