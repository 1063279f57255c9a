"""The one error of importing a model: the source, and what is wrong with it, in one line."""

from __future__ import annotations


class ImportSourceError(ValueError):
    """A model source is unknown or missing, in a format we do not read, or unsafe (pickled code)."""
