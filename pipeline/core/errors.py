"""The one error family of tilewise.

Every message names the problem *and* the fix; only the CLI turns these into exit code 2.
"""

from __future__ import annotations


class TilewiseError(Exception):
    """Base class: a problem the user can fix (bad input, conflicting output, bad options)."""


class InputError(TilewiseError):
    """The input store, file or array cannot be read as asked."""


class OutputExistsError(TilewiseError):
    """An output would be overwritten without ``--overwrite``."""


class OptionError(TilewiseError):
    """A command-line or API option is malformed or inconsistent."""
