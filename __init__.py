"""EasyAnimate v1 text-to-video for ComfyUI: native MODEL / CLIP / VAE plus a few nodes (see README)."""
import logging

MIN_COMFYUI = (0, 3, 75)


def _comfyui_version():
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    return tuple(int(p) for p in __version__.split(".")[:3] if p.isdigit())


_version = _comfyui_version()
if _version is not None and _version < MIN_COMFYUI:
    logging.error("EasyAnimate nodes need ComfyUI >= %s, this is %s: update ComfyUI if the nodes fail",
                  ".".join(map(str, MIN_COMFYUI)), ".".join(map(str, _version)))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
