"""Image references, normalised the way docker (and so containerd's CRI labels) does.

`nginx` must mean the same repository here as in the `containerd.io/snapshot/cri.image-ref`
label, so the rules follow docker's `ParseNormalizedNamed`: a first path component is a
registry only if it looks like a host (has `.` or `:`, or is `localhost`); Docker Hub names get
`library/`; `index.docker.io` is the legacy spelling of `docker.io`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass

from stargzfs.digest import is_layer_hex, validate_digest
from stargzfs.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_LEGACY = "index.docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

# Grammar from distribution/reference (regexp.go), restated.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"

_PATH_COMPONENT_RE = re.compile(rf"^{_PATH_COMPONENT}$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_MAX_NAME_LENGTH = 255
_MAX_PORT = 65535


@dataclass(frozen=True)
class Reference:
    """A fully normalised image reference; `tag` is "latest" when neither tag nor digest was given."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host that serves the /v2/ API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """`registry/repository` without tag or digest (the per-repository cache key)."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain == DOCKER_HUB_LEGACY:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def parse_reference(ref: str) -> Reference:
    """Parse and normalise `ref`; UsageError names what is wrong with it."""
    if not isinstance(ref, str) or not ref:
        raise UsageError("invalid image reference '': empty")
    if ref != ref.strip() or any(ch.isspace() for ch in ref):
        raise UsageError(f"invalid image reference {ref!r}: contains whitespace")
    remainder, at, digest = ref.partition("@")
    digest_value: str | None = None
    if at:
        digest_value = validate_digest(digest, f" in image reference {ref!r}")
    tag: str | None = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid image reference {ref!r}: invalid tag {tag!r}")
    if not remainder:
        raise UsageError(f"invalid image reference {ref!r}: missing repository name")
    if is_layer_hex(remainder):
        raise UsageError(
            f"invalid image reference {ref!r}: a 64-hex-digit string is an image id, not a repository"
        )
    domain, path = _split_domain(remainder)
    if not _DOMAIN_RE.match(domain):
        raise UsageError(f"invalid image reference {ref!r}: invalid registry host {domain!r}")
    _bare, port = split_host_port(domain)
    if port is not None and not valid_port(port):
        raise UsageError(f"invalid image reference {ref!r}: port {port} is not in 1-{_MAX_PORT}")
    components = path.split("/")
    for component in components:
        if not _PATH_COMPONENT_RE.match(component):
            problem = "must be lower case" if component.lower() != component else "invalid"
            raise UsageError(
                f"invalid image reference {ref!r}: repository component {component!r} {problem}"
            )
    if len(domain) + 1 + len(path) > _MAX_NAME_LENGTH:
        raise UsageError(f"invalid image reference {ref!r}: name longer than {_MAX_NAME_LENGTH}")
    if tag is None and digest_value is None:
        tag = DEFAULT_TAG
    return Reference(registry=domain, repository=path, tag=tag, digest=digest_value)


def as_reference(ref: "Reference | str") -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


def valid_port(port: int) -> bool:
    return 0 < port <= _MAX_PORT


def validate_registry_host(host: str, what: str) -> str:
    """`host[:port]` as a registry is written in a reference (for --insecure-registry and the like)."""
    _bare, port = split_host_port(host)
    if not _DOMAIN_RE.fullmatch(host) or (port is not None and not valid_port(port)):
        raise UsageError(f"{what} {host!r} is not a registry HOST[:PORT]")
    return host


def split_host_port(host: str) -> tuple[str, int | None]:
    """`[::1]:5000` → ("::1", 5000); `example.com` → ("example.com", None)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        bare, rest = host[1:end], host[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
        return bare, port
    if host.count(":") == 1:
        bare, _, port_text = host.partition(":")
        return bare, int(port_text) if port_text.isdigit() else None
    return host, None


def _is_local_address(bare_host: str) -> bool:
    if bare_host == "localhost" or bare_host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(bare_host)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    if isinstance(address, ipaddress.IPv4Address):
        return any(
            address in ipaddress.ip_network(network)
            for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
        )
    return False


def default_scheme(host: str, insecure_hosts: Collection[str] = ()) -> str:
    """http for loopback/RFC 1918/localhost names and the listed hosts, https otherwise.

    A listed host matches with or without its port (`myreg:5000` or `myreg`).
    """
    bare, _port = split_host_port(host)
    listed = set(insecure_hosts)
    if host in listed or bare in listed or _is_local_address(bare):
        return "http"
    return "https"
