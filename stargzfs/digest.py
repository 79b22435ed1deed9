"""OCI content digests (`algorithm:hex`), validated in exactly one place.

Layer digests arrive from command lines, snapshot labels, manifests and file names; a
digest that is not one a registry can serve must fail as a usage error naming it, before
any request is made. Only the algorithms OCI registers are accepted, each with its exact
length of lower-case hex (what `sha256sum` prints, what containerd writes).
"""

from __future__ import annotations

import hashlib

from stargzfs.errors import UsageError

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX_DIGITS = frozenset("0123456789abcdef")


def is_hex(text: str, length: int) -> bool:
    """`text` is exactly `length` lower-case hex digits."""
    return len(text) == length and _HEX_DIGITS.issuperset(text)


def is_layer_hex(text: str) -> bool:
    """The 64-hex form nydus names layer bootstraps, blob ids and blob.meta files by."""
    return is_hex(text, HEX_LENGTHS["sha256"])


def digest_problem(digest: object) -> str | None:
    """None for a valid digest, else a short reason (no exception: callers decide the error)."""
    if not isinstance(digest, str):
        return "not a string"
    algorithm, colon, encoded = digest.partition(":")
    if not colon:
        return "expected algorithm:hex, e.g. sha256:<64 hex>"
    length = HEX_LENGTHS.get(algorithm)
    if length is None:
        return f"algorithm {algorithm[:20]!r} is not one of {', '.join(HEX_LENGTHS)}"
    if not is_hex(encoded, length):
        return f"{algorithm} needs {length} lower-case hex digits"
    return None


def validate_digest(digest: str, where: str = "") -> str:
    """`digest` itself, or UsageError (exit 2) naming it, `where` it came from and what is wrong."""
    problem = digest_problem(digest)
    if problem is not None:
        raise UsageError(f"invalid digest {str(digest)[:200]!r}{where}: {problem}")
    return digest


def sha256_hex_of(digest: str) -> str | None:
    """The 64 hex digits of a `sha256:` digest, None for anything else (labels: no exception)."""
    algorithm, _, encoded = digest.partition(":")
    return encoded if algorithm == "sha256" and is_layer_hex(encoded) else None


def require_sha256(digest: str, what: str = "digest") -> str:
    """`digest` when it is `sha256:<64 hex>`, else UsageError."""
    if sha256_hex_of(digest) is None:
        raise UsageError(f"invalid {what} {str(digest)[:200]!r}: expected sha256:<64 hex> in lower case")
    return digest


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
