"""The project's exception types.

Every error a user can cause (a bad flag, a corrupt file, an unreadable checkpoint) is raised as one of
these, with a message that names the file, flag or field to change. Entry points (``pretrain_cola.py``,
``tools/*.py``) catch ``MegatronColaError`` alone and print its message without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MegatronColaError(Exception):
    """Base class: a fault in the user's input, files or environment, not in our code."""


class ConfigError(MegatronColaError, ValueError):
    """Flags or a model/training configuration that contradict each other or cannot work."""


class DataError(MegatronColaError, ValueError):
    """A dataset, corpus or tokenizer that cannot be read or does not fit the run."""


class CheckpointError(MegatronColaError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or from an incompatible run."""


class ConversionError(MegatronColaError, ValueError):
    """A checkpoint or Hugging Face folder that cannot be converted; the message names the tensor or field."""


class TrainingError(MegatronColaError, RuntimeError):
    """A run that must stop: repeated non-finite losses or gradients, and the like."""
