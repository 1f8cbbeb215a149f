"""ComfyUI glue: the node classes of every nodes_*.py, merged."""
import importlib

from .model_files import register_folders

register_folders()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_MODULES = ["nodes_loaders", "nodes_lora", "nodes_text", "nodes_schedule", "nodes_latent", "nodes_sampler",
            "nodes_context", "nodes_vae",
            "nodes_video"]

for _name in _MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
