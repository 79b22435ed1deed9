"""Where registry credentials come from: the caller's own (snapshot labels), docker's
config.json, its credential helpers; else anonymous (nydus-snapshotter's keychain order).

The caller passes credentials it already holds (the conversion glue reads them from snapshot
labels, whose names only stargzfs.snapshots knows). Secrets live only in
`Credentials.secret`: never in reprs, messages, logs or a child's argv.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from stargzfs.errors import UsageError
from stargzfs.registry.reference import DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_LEGACY, Reference

DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

_HELPER_TIMEOUT = 10.0


@dataclass(frozen=True)
class Credentials:
    """A username + secret; an empty username means the secret is a registry bearer token."""

    username: str
    secret: str = field(repr=False)

    @property
    def is_token(self) -> bool:
        return self.username == "" and self.secret != ""

    def __repr__(self) -> str:
        who = "<token>" if self.is_token else repr(self.username)
        return f"Credentials(username={who}, secret=<hidden>)"

    __str__ = __repr__

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def docker_config_path(docker_config: Path | None = None) -> Path:
    """An explicit file or directory, else `$DOCKER_CONFIG/config.json`, else ~/.docker/config.json."""
    if docker_config is not None:
        path = Path(docker_config)
        return path / "config.json" if path.is_dir() else path
    env_dir = os.environ.get("DOCKER_CONFIG")
    if env_dir:
        return Path(env_dir) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _config_key_host(key: str) -> str:
    """Docker's file store matches `auths` keys by host: drop scheme and path."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip())
    return host.split("/", 1)[0].lower()


def _candidate_hosts(ref: Reference) -> list[str]:
    if ref.registry == DOCKER_HUB:
        return [DOCKER_HUB_LEGACY, DOCKER_HUB, DOCKER_HUB_API]
    return [ref.registry.lower()]


def _entry_credentials(entry: object, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: auths entry {key!r} is not an object")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(f"{path}: auths entry {key!r} has an invalid base64 'auth'") from None
        username, colon, secret = decoded.partition(":")
        if not colon:
            raise UsageError(f"{path}: auths entry {key!r} 'auth' is not base64(user:password)")
    else:
        username = entry.get("username") or ""
        secret = entry.get("password") or ""
        if not isinstance(username, str) or not isinstance(secret, str):
            raise UsageError(f"{path}: auths entry {key!r} has a non-string username/password")
    # Upstream ignores identity-token-only entries: user AND password are required.
    if username and secret:
        return Credentials(username, secret)
    return None


def credentials_from_docker_config(ref: Reference, docker_config: Path | None = None) -> Credentials | None:
    """Look `ref`'s registry up in docker's config.json `auths` (Hub under its legacy key too)."""
    path = docker_config_path(docker_config)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read docker config: {exc.strerror}") from None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: docker config is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: docker config is not a JSON object")
    auths = document.get("auths")
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not an object")
    helper = _credential_helper_name(document, ref, path)
    if helper:
        found = _credentials_from_helper(helper, ref)
        if found is not None:
            return found
    # Exact keys first (the registry as written, Hub's legacy URL), then docker's by-host match.
    keys = [key for key in (ref.registry, DOCKER_HUB_CONFIG_KEY if ref.registry == DOCKER_HUB else None)
            if key is not None and key in auths]
    by_host: dict[str, str] = {}
    for key in auths:
        by_host.setdefault(_config_key_host(key), key)
    keys += [by_host[host] for host in _candidate_hosts(ref) if host in by_host and by_host[host] not in keys]
    for key in keys:
        found = _entry_credentials(auths[key], path, key)
        if found is not None:
            return found
    return None


def _credential_helper_name(document: dict, ref: Reference, path: Path) -> str | None:
    """docker's rule: a per-registry `credHelpers` entry, else the global `credsStore`."""
    helpers = document.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise UsageError(f"{path}: 'credHelpers' is not an object")
    for host in [ref.registry.lower(), *_candidate_hosts(ref)]:
        if isinstance(helpers.get(host), str) and helpers[host]:
            return helpers[host]
    store = document.get("credsStore")
    return store if isinstance(store, str) and store else None


def _credentials_from_helper(helper: str, ref: Reference) -> Credentials | None:
    """Run `docker-credential-<helper> get`; the server URL goes on stdin, the answer on stdout.

    Nothing secret is ever in argv; the helper's output is never echoed into errors.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise UsageError(f"docker config names an invalid credential helper {helper!r}")
    program = f"docker-credential-{helper}"
    server = DOCKER_HUB_CONFIG_KEY if ref.registry == DOCKER_HUB else ref.registry
    try:
        result = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=_HELPER_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise UsageError(f"docker config uses credential helper {program!r}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"credential helper {program!r} did not answer within {_HELPER_TIMEOUT:g}s") from None
    if result.returncode != 0:
        if b"credentials not found" in result.stdout.lower() + result.stderr.lower():
            return None
        raise UsageError(f"credential helper {program!r} failed for {server} (exit {result.returncode})")
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"credential helper {program!r} gave an answer that is not its JSON format") from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise UsageError(f"credential helper {program!r} gave a non-string Username/Secret")
    # "<token>" marks an identity token, which upstream ignores like identity-token-only entries.
    if username and secret and username != "<token>":
        return Credentials(username, secret)
    return None


def resolve_credentials(
    ref: Reference,
    given: Credentials | None = None,
    docker_config: Path | None = None,
) -> Credentials | None:
    """The caller's own → docker config.json → None (anonymous), first hit wins (spec §3)."""
    return given or credentials_from_docker_config(ref, docker_config)


class CredentialCache:
    """`resolve_credentials` for async callers: off the event loop, remembered for a short while.

    Reading config.json and running a `docker-credential-*` helper block (a helper for up to
    its timeout): a daemon's loop must keep serving meanwhile, and the layers of one image
    converted in a burst should not run the helper once each. Label credentials need no I/O
    and are never cached; failures are not cached either.
    """

    def __init__(self, docker_config: Path | None = None, ttl: float = 30.0) -> None:
        self._docker_config = docker_config
        self._ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, Credentials | None]] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}
        self.lookups = 0  # docker-config lookups actually run (for tests and diagnostics)

    def __repr__(self) -> str:
        return f"CredentialCache(entries={len(self._entries)})"

    async def resolve(self, ref: Reference, given: Credentials | None = None) -> Credentials | None:
        if given is not None:
            return given
        key = (ref.registry, ref.repository)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:  # one helper run per key at a time; waiters take its answer
            cached = self._entries.get(key)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            self.lookups += 1
            found = await anyio.to_thread.run_sync(credentials_from_docker_config, ref, self._docker_config)
            self._entries[key] = (time.monotonic() + self._ttl, found)
            return found
