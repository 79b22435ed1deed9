"""Settings of `stargzfs mount`: defaults <- TOML config file (`--config`) <- command line.

The config file is a nydus-snapshotter `config.toml`; where the snapshotter has a key for
a setting, stargzfs reads that key, so the snapshotter's own file can be passed as it is
(keys stargzfs does not use are ignored). Settings the snapshotter has no key for live in
a `[stargzfs]` table, whose keys are checked strictly.

| setting              | TOML key                         | CLI                     | default                  |
|----------------------|----------------------------------|-------------------------|--------------------------|
| root                 | `root`                           | ROOT (positional)       | (required)               |
| cache_dir            | `[cache_manager] cache_dir`      | `--cache-dir`           | ROOT/cache               |
| fs_driver            | `[daemon] fs_driver`             | `--fs-driver`           | `fusedev`                |
| nydus_image          | `[daemon] nydusimage_path`       | `--nydus-image`         | none -> `stargzfs-image` |
| log_level            | `[log] level`                    | `--log-level`           | `info`                   |
| mountpoint           | `[stargzfs] mountpoint`          | MOUNTPOINT (positional) | (required)               |
| foreground           | `[stargzfs] foreground`          | `-f/--foreground`       | false                    |
| rw                   | `[stargzfs] rw`                  | `--rw`                  | false                    |
| log_file             | `[stargzfs] log_file`            | `--log-file`            | none (stderr)            |
| insecure_registries  | `[stargzfs] insecure_registries` | `--insecure-registry`   | []                       |
| fuse_options         | `[stargzfs] fuse_options`        | `-o OPT[,OPT]`          | []                       |
| max_builders         | `[stargzfs] max_builders`        | -                       | CPU count                |
| prefetch             | `[stargzfs] prefetch`            | `--no-prefetch`         | true                     |
| background_fetch     | `[stargzfs] background_fetch`    | `--background-fetch`    | false                    |
| builder_memory_mib   | `[stargzfs] builder_memory_mib`  | -                       | 4096 (0: no limit)       |
| builder_cpu_seconds  | `[stargzfs] builder_cpu_seconds` | -                       | 300 (0: no limit)        |
| entry_timeout        | `[stargzfs] entry_timeout`       | -                       | 1.0 s                    |
| attr_timeout         | `[stargzfs] attr_timeout`        | -                       | 1.0 s                    |
| retry_backoff        | `[stargzfs] retry_backoff`       | -                       | 5.0 s (first retry wait) |
| retry_backoff_max    | `[stargzfs] retry_backoff_max`   | -                       | 300.0 s                  |
| registry_timeout     | `[stargzfs] registry_timeout`    | `--registry-timeout`    | 10.0 s (per attempt)     |
| registry_retries     | `[stargzfs] registry_retries`    | `--registry-retries`    | 3 (extra attempts)       |
| auth_timeout         | `[stargzfs] auth_timeout`        | `--auth-timeout`        | 10.0 s (token request)   |
| registry_min_rate    | `[stargzfs] registry_min_rate`   | `--registry-min-rate`   | 16384 bytes/s            |
| hosts_dir            | `[remote.mirrors_config] dir`    | `--hosts-dir`           | /etc/containerd/certs.d if it exists |
| metrics_address      | `[metrics] address`              | `--metrics-address`     | none (no endpoint)       |

registry_timeout bounds, per attempt, the wait for a registry's answer and each silence in its
body (not the whole transfer, so large reads work on slow links); a request that
times out, cannot connect or gets a 5xx is tried again up to registry_retries more times
with a short doubling pause (0.2 s, 0.4 s, ...), so a lookup against a registry that never
answers fails with EIO after about (registry_retries + 1) x registry_timeout. Whatever the
answer's pace, one request to one host ends within registry_timeout + bytes / registry_min_rate
(a trickling server cannot hold a conversion). hosts_dir is containerd's certs.d tree
(hosts.toml per registry: mirrors, CAs, client certificates; see stargzfs.registry.hosts).
metrics_address `[HOST]:PORT` serves Prometheus metrics at /metrics (`:PORT` = loopback only).

Each builder subprocess (which parses the untrusted TOC) runs under RLIMIT_AS =
builder_memory_mib and RLIMIT_CPU = builder_cpu_seconds, so a hostile TOC can only fail
its own conversion.

An empty string for a snapshotter key means "unset" there, and so it does here.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from stargzfs.errors import UsageError
from stargzfs.fuse.config import DaemonSettings
from stargzfs.snapshots import layout

FS_DRIVERS = ("fusedev", "fscache")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class MountSettings:
    """Everything the mount daemon and the lazy pipeline need to know."""

    root: Path
    mountpoint: Path
    foreground: bool = False
    rw: bool = False
    fs_driver: str = "fusedev"
    cache_dir: Path | None = None  # None -> ROOT/cache (see `effective_cache_dir`)
    nydus_image: Path | None = None  # None -> the bundled stargzfs-image
    insecure_registries: tuple[str, ...] = ()
    log_level: str = "info"
    log_file: Path | None = None
    fuse_options: tuple[str, ...] = ()
    max_builders: int = field(default_factory=lambda: os.cpu_count() or 1)
    prefetch: bool = True  # lazy blobs: fetch the files before .prefetch.landmark on first open
    background_fetch: bool = False  # lazy blobs: then fill in the rest, yielding to reads
    builder_memory_mib: int = 4096
    builder_cpu_seconds: int = 300
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    retry_backoff: float = 5.0
    retry_backoff_max: float = 300.0
    registry_timeout: float = 10.0
    registry_retries: int = 3
    auth_timeout: float = 10.0
    registry_min_rate: float = float(16 * 1024)  # = stargzfs.registry.transport.DEFAULT_MIN_RATE
    hosts_dir: Path | None = None  # None -> /etc/containerd/certs.d when it exists
    metrics_address: str | None = None

    @property
    def effective_hosts_dir(self) -> Path | None:
        if self.hosts_dir is not None:
            return self.hosts_dir
        from stargzfs.registry.hosts import default_hosts_dir

        return default_hosts_dir()

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else layout.default_cache_dir(self.root)

    @property
    def metadata_db(self) -> Path:
        return layout.metadata_db(self.root)

    @property
    def daemon(self) -> DaemonSettings:
        """The part the FUSE daemon sees (it knows nothing of registries or builders)."""
        return DaemonSettings(
            mountpoint=self.mountpoint, rw=self.rw, fuse_options=self.fuse_options,
            entry_timeout=self.entry_timeout, attr_timeout=self.attr_timeout,
            log_level=self.log_level, log_file=self.log_file,
        )

    def validated(self) -> "MountSettings":
        """Check value ranges; raise UsageError naming the first bad setting."""
        if self.fs_driver not in FS_DRIVERS:
            raise UsageError(f"fs_driver must be one of {', '.join(FS_DRIVERS)}, not {self.fs_driver!r}")
        if self.log_level not in LOG_LEVELS:
            raise UsageError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.max_builders < 1:
            raise UsageError(f"max_builders must be >= 1, not {self.max_builders}")
        for name in ("builder_memory_mib", "builder_cpu_seconds"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0 (0: no limit), not {getattr(self, name)}")
        for name in ("entry_timeout", "attr_timeout", "retry_backoff", "retry_backoff_max"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, not {getattr(self, name)}")
        for name in ("registry_timeout", "auth_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise UsageError(f"{name} must be a positive number of seconds, not {getattr(self, name)}")
        if self.registry_retries < 0:
            raise UsageError(f"registry_retries must be >= 0, not {self.registry_retries}")
        if not 0 < self.registry_min_rate < math.inf:
            raise UsageError(f"registry_min_rate must be a positive number of bytes/s, not {self.registry_min_rate}")
        from stargzfs.registry.reference import validate_registry_host

        for host in self.insecure_registries:
            validate_registry_host(host, "insecure registry")
        if self.metrics_address is not None:
            from stargzfs.metrics import parse_address

            parse_address(self.metrics_address)
        return self


# TOML (table, key) -> MountSettings field, for keys nydus-snapshotter also has.
_SNAPSHOTTER_KEYS: dict[tuple[str, ...], str] = {
    ("root",): "root",
    ("cache_manager", "cache_dir"): "cache_dir",
    ("daemon", "fs_driver"): "fs_driver",
    ("daemon", "nydusimage_path"): "nydus_image",
    ("log", "level"): "log_level",
    ("remote", "mirrors_config", "dir"): "hosts_dir",
    ("metrics", "address"): "metrics_address",
}
_STARGZFS_KEYS = (
    "mountpoint", "foreground", "rw", "prefetch", "background_fetch", "log_file", "insecure_registries",
    "fuse_options", "max_builders", "builder_memory_mib", "builder_cpu_seconds", "entry_timeout", "attr_timeout",
    "retry_backoff", "retry_backoff_max", "registry_timeout", "registry_retries", "auth_timeout", "registry_min_rate",
)
_PATH_FIELDS = {"root", "mountpoint", "cache_dir", "nydus_image", "log_file", "hosts_dir"}
_BOOL_FIELDS = {"foreground", "rw", "prefetch", "background_fetch"}
_LIST_FIELDS = {"insecure_registries", "fuse_options"}
_INT_FIELDS = {"max_builders", "builder_memory_mib", "builder_cpu_seconds", "registry_retries"}
_FLOAT_FIELDS = {
    "entry_timeout", "attr_timeout", "retry_backoff", "retry_backoff_max", "registry_timeout", "auth_timeout",
    "registry_min_rate",
}


def _convert(key: str, name: str, value: Any) -> Any:
    """Type-check one config value; `key` is how the user wrote it, for the error."""
    if isinstance(value, list) and any("\0" in str(v) for v in value):
        raise UsageError(f"config key {key} contains a NUL byte")
    if name in _PATH_FIELDS or name in ("fs_driver", "log_level", "metrics_address"):
        if not isinstance(value, str):
            raise UsageError(f"config key {key} must be a string")
        if "\0" in value:
            raise UsageError(f"config key {key} contains a NUL byte")
        if value == "":
            return None
        return Path(value) if name in _PATH_FIELDS else value.lower()
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise UsageError(f"config key {key} must be true or false")
        return value
    if name in _LIST_FIELDS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"config key {key} must be a list of strings")
        return tuple(value)
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config key {key} must be an integer")
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key} must be a number")
        return float(value)
    raise AssertionError(name)  # pragma: no cover


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config into {MountSettings field: value}; unset keys are left out."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for keys, name in _SNAPSHOTTER_KEYS.items():
        node: Any = document
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            converted = _convert(".".join(keys), name, node)
            if converted is not None:
                values[name] = converted
    own = document.get("stargzfs", {})
    if not isinstance(own, dict):
        raise UsageError("config key stargzfs must be a table")
    for key, value in own.items():
        if key not in _STARGZFS_KEYS:
            raise UsageError(f"unknown config key stargzfs.{key}")
        converted = _convert(f"stargzfs.{key}", key, value)
        if converted is not None:
            values[key] = converted
    return values


def build_settings(cli: dict[str, Any], config: Path | None = None) -> MountSettings:
    """Merge defaults, the config file and CLI values (None = not given on the CLI)."""
    merged: dict[str, Any] = load_config(config) if config is not None else {}
    for name, value in cli.items():
        if value is None or (name in _LIST_FIELDS and not value):
            continue
        merged[name] = tuple(value) if name in _LIST_FIELDS else value
    for name in ("root", "mountpoint"):
        if name not in merged:
            raise UsageError(f"no {name.upper()} given (command line or config file)")
    known = {f.name for f in fields(MountSettings)}
    unknown = set(merged) - known
    if unknown:
        raise AssertionError(f"not settings: {sorted(unknown)}")  # programming error
    for name in _PATH_FIELDS:
        value = merged.get(name)
        if value is not None and "\0" in str(value):
            raise UsageError(f"{name} {str(value)!r} contains a NUL byte")
        if value is None or (name == "nydus_image" and "/" not in str(value)):
            continue  # a bare builder name is looked up on PATH when it runs
        merged[name] = Path(os.path.abspath(Path(value).expanduser()))
    return MountSettings(**merged).validated()


__all__ = ["MountSettings", "load_config", "build_settings", "FS_DRIVERS", "LOG_LEVELS"]
