"""The errors steer_lens raises.

Every error is a subclass of :class:`SteerLensError`. Each message says what was wrong, what was
expected and how to fix it, and ends with a link to the documentation page for that error (one page
per error, as in nnsight). Errors are raised *before* anything is changed: a model, a vector or a
file on disk is left as it was.

Where an error is also a classic Python error (a bad value, a missing key) the class inherits from
that built-in too, so ``except ValueError`` keeps working for users who already catch it.
"""

from __future__ import annotations

__all__ = [
    "SteerLensError",
    "ConfigError",
    "HookNameError",
    "ShapeMismatchError",
    "NonFiniteError",
    "EmptyInputError",
    "SequenceTooLongError",
    "ModelNotAvailableError",
    "IncompatibleVectorError",
    "TrainingDivergedError",
    "RewardError",
    "MetricError",
    "MissingDependencyError",
]

DOCS_URL = "https://steer-lens.readthedocs.io/en/latest/errors/"


class SteerLensError(Exception):
    """Base class of every error steer_lens raises.

    The message is the text given, followed by a link to the error's documentation page
    (``docs/errors/<ClassName>.md``).
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"{message}\n  (see {DOCS_URL}{type(self).__name__}/)")


class ConfigError(SteerLensError, ValueError):
    """A configuration field has a value outside its allowed range.

    Raised by the ``__post_init__`` of the frozen config dataclasses (``SFTConfig`` and friends) and
    by constructors; the message names the field, the value, what was expected and how to fix it.
    """


class HookNameError(SteerLensError, KeyError):
    """A hook point name is not in the model (the message suggests the closest names).

    Also raised when a hook exists but does not carry the residual-stream width ``d_model``.
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return Exception.__str__(self)


class ShapeMismatchError(SteerLensError, ValueError):
    """A tensor's shape does not match what the model or the vector expects (e.g. ``d_model``)."""


class NonFiniteError(SteerLensError, ValueError):
    """A scale, vector, metric or reward holds NaN or infinity."""


class EmptyInputError(SteerLensError, ValueError):
    """A list of texts, examples or prompts is empty, or a completion has no tokens."""


class SequenceTooLongError(SteerLensError, ValueError):
    """A prompt (plus the tokens to generate) is longer than the model's context ``n_ctx``."""


class ModelNotAvailableError(SteerLensError, OSError):
    """A model name is neither in the Hugging Face cache nor downloadable (e.g. offline mode)."""


class IncompatibleVectorError(SteerLensError, ValueError):
    """A saved vector or a LoRA adapter was made for another model, architecture, width or weight
    processing than the one given (the message names both sides)."""


class TrainingDivergedError(SteerLensError, FloatingPointError):
    """The loss or a gradient became NaN/inf during training.

    The vectors are restored to the last finite state before this is raised, and (when
    checkpointing is on) that state is in the checkpoint folder.
    """


class RewardError(SteerLensError, ValueError):
    """A reward function raised, returned the wrong shape, or returned NaN/inf."""


class MetricError(SteerLensError, ValueError):
    """A metric returned the wrong shape or a non-finite value."""


class MissingDependencyError(SteerLensError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
