"""OCI registry access: references, credentials/auth, checked ranged blob reads."""

from stargzfs.registry.auth import (
    LABEL_PULL_SECRET,
    LABEL_PULL_USERNAME,
    Credentials,
    RegistryAuth,
    resolve_credentials,
)
from stargzfs.registry.client import BlobReader, RegistryClient, RegistryConfig, RegistryRequestError
from stargzfs.registry.reference import Reference, default_scheme, parse_reference

__all__ = [
    "LABEL_PULL_SECRET",
    "LABEL_PULL_USERNAME",
    "BlobReader",
    "Credentials",
    "Reference",
    "RegistryAuth",
    "RegistryClient",
    "RegistryConfig",
    "RegistryRequestError",
    "default_scheme",
    "parse_reference",
    "resolve_credentials",
]
