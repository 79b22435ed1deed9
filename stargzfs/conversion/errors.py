"""How a conversion can end, each with what the FUSE request answers and whether to retry."""

from __future__ import annotations

import errno

from stargzfs.errors import StargzfsError


class NotConvertible(StargzfsError):
    """A layer this mount will never turn into a bootstrap; remembered, never fetched again.

    `code` is what the FUSE request answers: ENOENT for a valid layer that simply has no
    bootstrap (plain, or a TOC layout nydusd cannot serve), EIO for a TOC that is broken.
    """

    def __init__(self, message: str, code: int = errno.ENOENT) -> None:
        super().__init__(message)
        self.code = code


class ConversionError(StargzfsError):
    """The conversion failed for a reason worth retrying later: EIO, then a backoff."""
