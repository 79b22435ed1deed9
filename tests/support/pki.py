"""A test CA and certificates made by the `openssl` CLI, and the system trust store changed the Debian way.

`TestPki(dir)` makes a CA (`ca.pem`) and issues server or client certificates with chosen names and
validity (`openssl ca` takes explicit start/end dates, so an expired certificate is a real one).
`system_trust(ca)` installs a CA with `update-ca-certificates` (as an administrator would, via
/usr/local/share/ca-certificates) and removes it afterwards, checking the bundle is as before.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Issued:
    """A certificate and its unencrypted key."""

    cert: Path
    key: Path


def _openssl(*args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _date(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%SZ")


class TestPki:
    """One CA under `workdir`; `issue()` signs certificates with it."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path, name: str = "stargzfs test CA") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = self.workdir / "ca.pem"
        self.ca_key = self.workdir / "ca.key"
        (self.workdir / "issued").mkdir(exist_ok=True)
        (self.workdir / "index.txt").write_text("")
        (self.workdir / "serial").write_text("1000\n")
        (self.workdir / "ca.cnf").write_text(
            "[ca]\ndefault_ca = test\n"
            f"[test]\ndir = {self.workdir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/issued\n"
            "serial = $dir/serial\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
            "unique_subject = no\nx509_extensions = leaf\n"
            "[any]\ncommonName = supplied\n"
            "[leaf]\nbasicConstraints = critical,CA:FALSE\nsubjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid\n"
        )
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
            "-keyout", self.ca_key, "-out", self.ca, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
        )

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        client: bool = False,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
    ) -> Issued:
        """A server (or client) certificate for the given names, by default valid from an hour ago for 2 days."""
        now = datetime.now(timezone.utc)
        start = valid_from or now - timedelta(hours=1)
        end = valid_until or now + timedelta(days=2)
        key = self.workdir / f"{name}.key"
        csr = self.workdir / f"{name}.csr"
        cert = self.workdir / f"{name}.pem"
        usage = "clientAuth" if client else "serverAuth"
        request = ["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                   "-subj", f"/CN={name}", "-addext", f"extendedKeyUsage={usage}"]
        names = [f"DNS:{host}" for host in dns] + [f"IP:{ip}" for ip in ips]
        if names and not client:
            request += ["-addext", "subjectAltName=" + ",".join(names)]
        _openssl(*request)
        _openssl("ca", "-batch", "-notext", "-config", self.workdir / "ca.cnf", "-cert", self.ca,
                 "-keyfile", self.ca_key, "-in", csr, "-out", cert,
                 "-startdate", _date(start), "-enddate", _date(end))
        return Issued(cert, key)

    def client_context(self, client: Issued | None = None) -> ssl.SSLContext:
        """For the tests' own requests (readiness, log sync) to a registry signed by this CA."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if client is not None:
            context.load_cert_chain(str(client.cert), str(client.key))
        return context


def _bundle_digest() -> str:
    return hashlib.sha256(SYSTEM_BUNDLE.read_bytes()).hexdigest() if SYSTEM_BUNDLE.exists() else ""


def _update_ca_certificates() -> None:
    done = subprocess.run(["update-ca-certificates"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"update-ca-certificates failed: {done.stderr.strip()}")


@contextmanager
def system_trust(ca: Path, name: str = "stargzfs-test-ca") -> Iterator[Path]:
    """`ca` trusted system-wide for the block (Debian: a .crt in /usr/local/share/ca-certificates
    + update-ca-certificates), then removed the same way; the bundle must end as it began."""
    if shutil.which("update-ca-certificates") is None:
        raise RuntimeError("update-ca-certificates not found (apt-get install ca-certificates)")
    before = _bundle_digest()
    LOCAL_CA_DIR.mkdir(parents=True, exist_ok=True)
    installed = LOCAL_CA_DIR / f"{name}.crt"
    if installed.exists():
        raise RuntimeError(f"{installed} exists already: a previous run did not clean up")
    shutil.copyfile(ca, installed)
    try:
        _update_ca_certificates()
        yield installed
    finally:
        installed.unlink(missing_ok=True)
        _update_ca_certificates()
    after = _bundle_digest()
    if after != before:
        raise RuntimeError("the system CA bundle differs from before the test after removing the test CA")


def unverified_context() -> ssl.SSLContext:
    """For readiness checks of registries whose certificate is broken on purpose (expired, wrong name)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
