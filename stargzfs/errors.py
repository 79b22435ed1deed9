"""Error types shared by every package.

Each error carries the process exit code the CLIs use for it, so a failure deep in
the pipeline maps to a distinct, documented exit status without string matching.
Messages must never contain secrets (passwords, tokens, Authorization headers).
"""

from __future__ import annotations


class StargzfsError(Exception):
    """Base of all expected failures: printed as one line, no traceback."""

    exit_code: int = 1


class UsageError(StargzfsError):
    """The command line or a config file asked for something impossible."""

    exit_code = 2


class NotEstargzError(StargzfsError):
    """The blob is a valid layer but not eStargz; a normal answer, not a fault."""

    exit_code = 3


class RegistryError(StargzfsError):
    """Talking to the registry failed (network, HTTP status, auth, bad answer)."""

    exit_code = 4


class FormatError(StargzfsError):
    """Input bytes (footer, TOC, bootstrap, blob.meta, metadata.db) are malformed."""

    exit_code = 5


class UnsupportedError(StargzfsError):
    """Well-formed input that stargzfs or nydusd cannot serve (e.g. innerOffset TOCs)."""

    exit_code = 6


class VerificationError(StargzfsError):
    """A digest did not match (TOC digest label, chunkDigest)."""

    exit_code = 7
