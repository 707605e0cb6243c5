"""The base class of every error the toolkit raises on purpose (bad input, mismatched artifacts...).

The command line prints such an error as one line and exits non-zero; any other exception is a bug and
is reported with a pointer to the stage log (``--debug`` shows the traceback on the console).
"""

from __future__ import annotations


class GqapruneError(Exception):
    """An expected failure with a message that names the key or file at fault and the fix."""


class InputError(GqapruneError, ValueError):
    """A file, folder or value given to the toolkit is missing or unusable."""


class NonFiniteError(GqapruneError, FloatingPointError):
    """A weight, activation or score is NaN or infinite; the message names the tensor and layer."""


class UnsupportedExportError(GqapruneError, ValueError):
    """The checkpoint (or its tokenizer) uses something the GGUF export cannot express; the message says what."""


class UnsupportedModelError(GqapruneError, ValueError):
    """The model's family or geometry cannot be pruned by this toolkit."""
