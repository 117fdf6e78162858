"""Errors of model loading."""


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names it and why."""
