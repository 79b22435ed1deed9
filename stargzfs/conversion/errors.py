"""How a conversion can end, each with what the FUSE request answers and whether to retry."""

from __future__ import annotations

from stargzfs.errors import StargzfsError


class NotConvertible(StargzfsError):
    """A valid layer this mount will never turn into a bootstrap: ENOENT, remembered."""


class ConversionError(StargzfsError):
    """The conversion failed for a reason worth retrying later: EIO, then a backoff."""
