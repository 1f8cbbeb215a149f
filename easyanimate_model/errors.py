"""The library's load error, in a module of its own so that every reader (weights, VAE, T5, LoRA) can raise it
without importing the transformer."""


class EasyAnimateLoadError(ValueError):
    """A file that cannot be loaded as asked; the message names the file, what was expected and what was found."""
