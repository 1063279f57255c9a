"""Dataset errors: one base class, so a pipeline stage can turn any of them into a clean failure."""

from __future__ import annotations

from collections.abc import Sequence


class DatasetError(Exception):
    """Base of every error the data layer raises on purpose (bad input, not a bug)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset files are not where they were looked for; the message says how to get them."""


class DatasetLayoutError(DatasetError, ValueError):
    """The dataset exists but its layout is wrong (empty class folder, unknown test class, bad archive)."""


class CorruptImagesError(DatasetError, ValueError):
    """Some image files could not be decoded; ``report`` lists every one as ``{"path", "error"}``."""

    def __init__(self, report: Sequence[dict[str, str]]):
        self.report = list(report)
        lines = "\n".join(f"  {r['path']}: {r['error']}" for r in self.report)
        super().__init__(
            f"{len(self.report)} unreadable image file(s) (set data.on_corrupt: skip to leave them out):\n{lines}"
        )


class PreparedDataError(DatasetError, ValueError):
    """A prepared dataset folder is missing pieces or does not match its manifest."""


class PreparedNotFoundError(PreparedDataError, FileNotFoundError):
    """There is no prepared dataset (no manifest) at the given folder."""


class OutputExistsError(DatasetError, FileExistsError):
    """The output folder holds something that is not a prepared dataset, so it is not replaced."""
