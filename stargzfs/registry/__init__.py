"""OCI registry access: references, credentials, the auth flow, checked ranged blob reads."""

from stargzfs.registry.auth import RegistryAuth
from stargzfs.registry.client import BlobReader, RegistryClient, RegistryConfig, RegistryRequestError
from stargzfs.registry.hosts import HostsConfigError, HostsDirectory
from stargzfs.registry.credentials import CredentialCache, Credentials, resolve_credentials
from stargzfs.registry.reference import Reference, default_scheme, parse_reference

__all__ = [
    "BlobReader",
    "CredentialCache",
    "HostsConfigError",
    "HostsDirectory",
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
