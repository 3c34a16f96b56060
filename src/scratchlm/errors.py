"""The one base error for user mistakes.

Every error that means "you asked for something that cannot be done" (a missing model
directory, a bad option value, a malformed data file, a request the server refuses) is a
``ScratchLMError``. The command line prints such an error as one line on stderr and exits
with code 2; the server answers 4xx with a JSON body. Any other exception is a bug in
scratchlm and shows its traceback.

``ScratchLMError`` is also a ``ValueError``, so code written against the older errors
(``except ValueError``) keeps working; ``NotFound`` is also a ``FileNotFoundError``.

>>> issubclass(ConfigError, ScratchLMError), issubclass(NotFound, FileNotFoundError)
(True, True)
"""

from __future__ import annotations


class ScratchLMError(ValueError):
    """A user mistake: reported in one line (CLI: exit code 2; server: 4xx)."""


class NotFound(ScratchLMError, FileNotFoundError):
    """A path or name the user gave that does not exist."""


class ConfigError(ScratchLMError):
    """A configuration (model, training, command options) that cannot work."""


class DataError(ScratchLMError):
    """Input data that cannot be used: an unreadable or malformed file, a bad size or split."""
