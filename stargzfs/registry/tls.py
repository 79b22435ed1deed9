"""TLS as the host is configured: the system trust store, plus hosts.toml `ca`, `client`, `skip_verify`.

httpx verifies against certifi's bundle by default, so a CA the administrator installed with
`update-ca-certificates` would not count. The stdlib `ssl` default context reads OpenSSL's
default paths, which on Debian are exactly the store that tool maintains
(/etc/ssl/certs/ca-certificates.crt and the hashed /etc/ssl/certs); per-host CA files are added
to it, as containerd adds them to Go's system pool.

Certificate failures become one line naming the reason (unknown CA, expired, wrong name, client
certificate refused) instead of OpenSSL's error stack.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from stargzfs.registry.hosts import HostsConfigError, TlsSettings

# Debian's bundle, for a Python whose OpenSSL was built with another openssldir.
DEBIAN_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

_UNKNOWN_CA = {2, 18, 19, 20, 21}  # X509_V_ERR_*: no issuer, self-signed, unable to verify the leaf
_VERIFY_REASONS = {
    9: "certificate not yet valid",
    10: "certificate expired",
    23: "certificate revoked",
    62: "wrong name: the certificate is not for this host",
    64: "wrong name: the certificate is not for this IP address",
}
_ALERT_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake refused (a client certificate may be required)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust our client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client certificate missing or refused (the server requires one it trusts)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client certificate missing or refused (the server requires one it trusts)",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS (plain HTTP?)",
    "RECORD_LAYER_FAILURE": "the server does not speak TLS (plain HTTP?)",
}


def system_context() -> ssl.SSLContext:
    """Verify against the host's trust store (what update-ca-certificates manages)."""
    context = ssl.create_default_context()
    paths = ssl.get_default_verify_paths()
    if paths.cafile is None and paths.capath is None and DEBIAN_CA_BUNDLE.is_file():
        context.load_verify_locations(cafile=str(DEBIAN_CA_BUNDLE))
    return context


def context_for(settings: TlsSettings) -> ssl.SSLContext:
    """The system store plus the host's CA files and client certificates (HostsConfigError if unusable)."""
    context = system_context()
    if settings.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for ca in settings.ca_files:
        try:
            context.load_verify_locations(cafile=str(ca))
        except FileNotFoundError:
            raise HostsConfigError(f"CA file {ca} does not exist") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise HostsConfigError(f"CA file {ca} holds no usable PEM certificate ({_short(exc)})") from None
    for certificate, key in settings.client_pairs:
        try:
            context.load_cert_chain(str(certificate), str(key) if key is not None else None, password=_no_password)
        except FileNotFoundError:
            raise HostsConfigError(f"client certificate {certificate} or its key does not exist") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise HostsConfigError(
                f"client certificate {certificate} is unusable ({_short(exc)}; encrypted keys are not supported)"
            ) from None
    return context


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on a terminal."""
    raise ValueError("encrypted private key")


def file_stamp(settings: TlsSettings) -> tuple[tuple[str, int, int], ...]:
    """Identity of the files a context was built from, so an edited CA file gets a new context."""
    stamps = []
    paths = list(settings.ca_files) + [p for pair in settings.client_pairs for p in pair if p is not None]
    for path in paths:
        try:
            info = os.stat(path)
            stamps.append((str(path), info.st_mtime_ns, info.st_size))
        except OSError:
            stamps.append((str(path), -1, -1))
    return tuple(stamps)


def describe_tls_failure(exc: BaseException) -> str | None:
    """A one-line reason when `exc` (or what caused it) is a TLS failure, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            code = current.verify_code
            detail = current.verify_message or current.reason or "verification failed"
            if code in _UNKNOWN_CA:
                return f"certificate not trusted: unknown CA ({detail})"
            return _VERIFY_REASONS.get(code, f"certificate rejected ({detail})")
        if isinstance(current, ssl.SSLError):
            reason = current.reason or ""
            return _ALERT_REASONS.get(reason, f"TLS failure ({reason.lower().replace('_', ' ') or _short(current)})")
        current = current.__cause__ or current.__context__
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return text[:200]
