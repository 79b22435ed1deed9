"""containerd's registry hosts configuration (`certs.d/<host>/hosts.toml`), read the same way.

A node's administrator says here which mirrors to try before a registry, which CA signs each
one, which client certificate to present, and extra headers; containerd and nydus-snapshotter
(`[remote.mirrors_config] dir`) read the same tree, so stargzfs must too. Rules restated from
containerd 1.6/1.7 (`remotes/docker/config`):

- The directory of registry `host:port` is the first that exists of `host_port_`, `host:port`
  and `_default`. A directory without `hosts.toml` uses docker's certificate files instead
  (`*.crt` CAs, `*.cert` + `*.key` client pairs) for the registry itself.
- `[host."<url>"]` tables are tried in file order, then `server` (default: the registry itself).
  A URL without a scheme is https; its path gets `/v2` appended unless it already ends in `/v2`
  or `override_path = true` says the path is the API root.
- `capabilities` (default all of pull, resolve, push), `ca` (a path or a list), `client` (a
  path, a list of paths, or a list of [cert, key] pairs), `skip_verify`, `[header]`, relative
  paths resolved against the hosts.toml directory.

Where we differ: a malformed hosts.toml is an error naming the file and key (containerd logs and
silently falls back to certificate files), and unknown keys other than containerd's
`dial_timeout`/`proxy` are refused.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stargzfs.errors import UsageError
from stargzfs.registry.reference import DOCKER_HUB, DOCKER_HUB_API, default_scheme, split_host_port, valid_port

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
HOSTS_FILE = "hosts.toml"
DEFAULT_NAMESPACE = "_default"
CAPABILITIES = ("pull", "resolve", "push")
_MAX_HOSTS_FILE = 1 << 20
_KNOWN_KEYS = {"server", "capabilities", "ca", "client", "skip_verify", "header", "override_path", "host"}
_IGNORED_KEYS = {"dial_timeout", "proxy"}  # containerd 1.7+/2.x knobs we do not implement


class HostsConfigError(UsageError):
    """A hosts.toml (or a file it names) is unusable: exit 2 from a command, EIO in a mount."""


@dataclass(frozen=True)
class TlsSettings:
    """What to trust and present on one host's TLS connections (system store + `ca`)."""

    ca_files: tuple[Path, ...] = ()
    client_pairs: tuple[tuple[Path, Path | None], ...] = ()  # (certificate, key or None: key in the cert file)
    skip_verify: bool = False


@dataclass(frozen=True)
class Endpoint:
    """One host a registry's content can come from: a mirror or the registry (server) itself."""

    scheme: str
    netloc: str  # host[:port], as in a URL
    path: str  # the API root: "/v2", or the URL's own path with override_path
    capabilities: frozenset[str] = frozenset(CAPABILITIES)
    tls: TlsSettings = field(default_factory=TlsSettings)
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False  # another host than the registry: requests carry ?ns=<registry>

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def describe(self) -> str:
        """How errors name this host: netloc, plus "mirror" for the hosts tried before the server."""
        return f"mirror {self.netloc}" if self.mirror else self.netloc


def host_dir_names(registry: str) -> list[str]:
    """Directory names containerd looks for, most specific first (`host_port_`, `host:port`, `_default`)."""
    names = []
    colon = registry.rfind(":")
    if colon > 0 and not registry.endswith("]"):
        names.append(f"{registry[:colon]}_{registry[colon + 1:]}_")
    names += [registry, DEFAULT_NAMESPACE]
    return names


def default_endpoint(registry: str, insecure_hosts: Collection[str] = ()) -> Endpoint:
    """The registry itself when nothing is configured: Hub's API host, the usual scheme rule."""
    netloc = DOCKER_HUB_API if registry == DOCKER_HUB else registry
    scheme = "https" if registry == DOCKER_HUB else default_scheme(netloc, insecure_hosts)
    return Endpoint(scheme, netloc, "/v2")


def _is_mirror(registry: str, netloc: str) -> bool:
    """containerd's isProxy: another host than the reference's (Hub's API host is Hub itself)."""
    return netloc != registry and not (registry == DOCKER_HUB and netloc == DOCKER_HUB_API)


class HostsDirectory:
    """A containerd hosts directory; `endpoints(registry)` reads it afresh each time.

    Re-reading (a few stats and one small TOML file per blob opened) follows containerd,
    where an edited hosts.toml applies without a restart.
    """

    def __init__(self, root: Path | None, insecure_hosts: Collection[str] = ()) -> None:
        self.root = root
        self.insecure_hosts = tuple(insecure_hosts)

    def __repr__(self) -> str:
        return f"HostsDirectory({str(self.root) if self.root else None!r})"

    def directory_for(self, registry: str) -> Path | None:
        if self.root is None:
            return None
        for name in host_dir_names(registry):
            candidate = self.root / name
            if candidate.is_dir():
                return candidate
        return None

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Hosts to try for `registry`, in order; the last one is the server."""
        directory = self.directory_for(registry)
        if directory is None:
            return [default_endpoint(registry, self.insecure_hosts)]
        path = directory / HOSTS_FILE
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_HOSTS_FILE + 1)
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise HostsConfigError(f"cannot read {path}: {exc.strerror}") from None
        if not raw.strip():
            return [_with_cert_files(default_endpoint(registry, self.insecure_hosts), directory)]
        if len(raw) > _MAX_HOSTS_FILE:
            raise HostsConfigError(f"{path}: larger than {_MAX_HOSTS_FILE} bytes")
        return _parse_hosts_file(path, raw, registry, self.insecure_hosts)


def _with_cert_files(endpoint: Endpoint, directory: Path) -> Endpoint:
    """docker's certs.d layout: `*.crt` are CAs, `X.cert` + `X.key` a client pair (key optional)."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
    except OSError as exc:
        raise HostsConfigError(f"cannot list {directory}: {exc.strerror}") from None
    cas = tuple(directory / name for name in names if name.endswith(".crt"))
    pairs = []
    for name in names:
        if name.endswith(".cert"):
            key = directory / (name[: -len(".cert")] + ".key")
            pairs.append((directory / name, key if key.is_file() else None))
    if not cas and not pairs:
        return endpoint
    return Endpoint(endpoint.scheme, endpoint.netloc, endpoint.path, endpoint.capabilities,
                    TlsSettings(cas, tuple(pairs)), endpoint.headers, endpoint.mirror)


def _parse_hosts_file(path: Path, raw: bytes, registry: str, insecure_hosts: Collection[str]) -> list[Endpoint]:
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HostsConfigError(f"{path} is not valid TOML: {exc}") from None
    _check_keys(path, "", document)
    hosts = document.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{path}: 'host' must be a table of [host.\"<url>\"] tables")
    endpoints = []
    for url, table in hosts.items():  # tomllib keeps file order
        if not isinstance(table, dict):
            raise HostsConfigError(f"{path}: host {url!r} must be a table")
        _check_keys(path, f'host."{url}".', table, nested=True)
        endpoints.append(_endpoint(path, f'host."{url}"', url, table, registry, insecure_hosts))
    server = document.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(f"{path}: 'server' must be a string")
    if server:
        endpoints.append(_endpoint(path, "server", server, document, registry, insecure_hosts))
    else:
        default = default_endpoint(registry, insecure_hosts)
        endpoints.append(_endpoint(path, "server", f"{default.scheme}://{default.netloc}", document, registry,
                                   insecure_hosts))
    return endpoints


def _check_keys(path: Path, prefix: str, table: dict[str, Any], *, nested: bool = False) -> None:
    allowed = _KNOWN_KEYS - ({"server", "host"} if nested else set())
    for key in table:
        if key not in allowed and key not in _IGNORED_KEYS:
            raise HostsConfigError(f"{path}: unknown key {prefix}{key}")


def _endpoint(
    path: Path, where: str, url: str, table: dict[str, Any], registry: str, insecure_hosts: Collection[str]
) -> Endpoint:
    scheme, netloc, api_path = _split_url(path, where, url, bool(_flag(path, where, table, "override_path")),
                                          insecure_hosts)
    capabilities = table.get("capabilities", list(CAPABILITIES))
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise HostsConfigError(f"{path}: {where} capabilities must be a list of strings")
    lowered = frozenset(c.lower() for c in capabilities) or frozenset(CAPABILITIES)
    unknown = sorted(lowered - set(CAPABILITIES))
    if unknown:
        raise HostsConfigError(f"{path}: {where} has unknown capability {unknown[0]!r} (pull, resolve, push)")
    tls = TlsSettings(
        tuple(_paths(path, where, "ca", table.get("ca"))),
        tuple(_client_pairs(path, where, table.get("client"))),
        bool(_flag(path, where, table, "skip_verify")),
    )
    return Endpoint(scheme, netloc, api_path, lowered, tls, _headers(path, where, table.get("header")),
                    _is_mirror(registry, netloc))


def _split_url(
    path: Path, where: str, url: str, override_path: bool, insecure_hosts: Collection[str]
) -> tuple[str, str, str]:
    explicit = "://" in url
    parts = urlsplit(url if explicit else f"https://{url}")
    problem = None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problem = "must be http(s)://HOST[:PORT][/PATH]"
    elif parts.query or parts.fragment or parts.username or parts.password:
        problem = "must not carry credentials, a query or a fragment"
    else:
        bare, port = split_host_port(parts.netloc)
        if not bare or (":" in parts.netloc.rsplit("]", 1)[-1] and port is None) or (port is not None
                                                                                    and not valid_port(port)):
            problem = "has an invalid host or port"
    if problem is not None:
        raise HostsConfigError(f"{path}: {where} URL {url!r} {problem}")
    # containerd defaults a scheme-less host to https; the reference rule (loopback/private/insecure
    # → http) is applied instead so `[host."127.0.0.1:5000"]` behaves like the plain reference does.
    scheme = parts.scheme if explicit else default_scheme(parts.netloc, insecure_hosts)
    api_path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override_path and not api_path.endswith("/v2"):
        api_path += "/v2"
    return scheme, parts.netloc.lower(), api_path.rstrip("/")


def _flag(path: Path, where: str, table: dict[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise HostsConfigError(f"{path}: {where} {key} must be true or false")
    return value


def _relative_to(path: Path, value: str) -> Path:
    """containerd: paths in hosts.toml are absolute or relative to its directory."""
    return Path(value) if os.path.isabs(value) else path.parent / value


def _paths(path: Path, where: str, key: str, value: Any) -> Iterable[Path]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise HostsConfigError(f"{path}: {where} {key} must be a path or a list of paths")
    return [_relative_to(path, item) for item in items]


def _client_pairs(path: Path, where: str, value: Any) -> Iterable[tuple[Path, Path | None]]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{path}: {where} client must be a path, a list of paths or of [cert, key] pairs")
    pairs: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str) and item:
            pairs.append((_relative_to(path, item), None))
        elif (isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item)
              and item[0]):
            pairs.append((_relative_to(path, item[0]), _relative_to(path, item[1]) if item[1] else None))
        else:
            raise HostsConfigError(f"{path}: {where} client entries must be paths or [cert, key] pairs")
    return pairs


def _headers(path: Path, where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError(f"{path}: {where} header must be a table")
    headers = []
    for name, content in value.items():
        values = [content] if isinstance(content, str) else content
        if (not name.isascii() or not name or any(ch in name for ch in " \t\r\n:")
                or not isinstance(values, list) or not all(isinstance(v, str) for v in values)
                or any("\r" in v or "\n" in v for v in values)):
            raise HostsConfigError(f"{path}: {where} header {name!r} must be a token with string value(s)")
        if name.lower() in ("authorization", "host", "range", "content-length"):
            raise HostsConfigError(f"{path}: {where} header {name!r} is set by stargzfs itself")
        headers += [(name, v) for v in values]
    return tuple(headers)


def default_hosts_dir() -> Path | None:
    """containerd's usual place, when this machine has it."""
    return DEFAULT_HOSTS_DIR if DEFAULT_HOSTS_DIR.is_dir() else None
