"""ComfyUI glue: the node classes of every nodes_*.py, merged, each with its declared INT/FLOAT bounds enforced."""
import functools
import importlib
import inspect
import math

from .model_files import register_folders

register_folders()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_MODULES = ["nodes_loaders", "nodes_lora", "nodes_text", "nodes_schedule", "nodes_latent", "nodes_sampler",
            "nodes_context", "nodes_vae", "nodes_video"]


def input_error(name, value, spec):
    """A message naming the input when an INT/FLOAT value breaks its declared type, bounds or is not finite."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else None) or {}
    if kind not in ("INT", "FLOAT"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and isinstance(value, float)):
        return f"{name}: expected {'an integer' if kind == 'INT' else 'a number'}, found {value!r}"
    if not math.isfinite(value):
        return f"{name}: expected a finite number, found {value}"
    if "min" in opts and value < opts["min"]:
        return f"{name}: {value} is smaller than the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}: {value} is bigger than the maximum {opts['max']}"
    return None


@functools.cache
def _numeric_specs(cls):
    # read once: the bounds are static, and INPUT_TYPES may list model folders
    types = cls.INPUT_TYPES()
    return {name: spec for section in ("required", "optional") for name, spec in (types.get(section) or {}).items()
            if isinstance(spec, tuple) and spec and spec[0] in ("INT", "FLOAT")}


def _errors(cls, values):
    specs = _numeric_specs(cls)
    return [e for name, value in values.items() if name in specs for e in [input_error(name, value, specs[name])] if e]


def guard_inputs(cls):
    """Enforce the declared INT/FLOAT bounds of `cls` (in place).

    ComfyUI skips its min/max check for every input a node's VALIDATE_INPUTS takes, and never checks NaN: the
    VALIDATE_INPUTS (same signature, so core passes the same inputs) checks those first, at /prompt; the node
    function checks all numeric inputs when it runs (values can also come from links).
    """
    validate = cls.__dict__.get("VALIDATE_INPUTS")
    if isinstance(validate, classmethod):
        original_validate = validate.__func__

        def checked_validate(klass, *args, **kwargs):
            errors = _errors(cls, kwargs)
            return "; ".join(errors) if errors else original_validate(klass, *args, **kwargs)

        checked_validate.__signature__ = inspect.signature(original_validate)  # core reads the argument names
        cls.VALIDATE_INPUTS = classmethod(checked_validate)

    if getattr(cls, "INPUT_IS_LIST", False):
        return cls
    function = getattr(cls, cls.FUNCTION)

    @functools.wraps(function)
    def checked(self, *args, **kwargs):
        errors = _errors(cls, kwargs)
        if errors:
            raise ValueError(f"{cls.__name__}: " + "; ".join(errors))
        return function(self, *args, **kwargs)

    setattr(cls, cls.FUNCTION, checked)
    return cls


for _name in _MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update({key: guard_inputs(cls) for key, cls in _module.NODE_CLASS_MAPPINGS.items()})
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
