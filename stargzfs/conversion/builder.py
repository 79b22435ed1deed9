"""The nydus-image compatible builder the mount runs: which one, its argv, one subprocess.

The bundled `stargzfs-image` or an external nydus-image whose CLI generation is detected
once from `--version` (v2.1.x takes `--blob-meta`; v2.2+ rejects it and needs
`--blob-data-size`, spec snapshotter §7). Paths handed to a builder are
`/proc/self/fd/<N>/<name>` of dir fds it inherits (see rootdirs), so a symlink planted in
place of a snapshot dir, or a rename of it while the builder runs, cannot redirect a write.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from stargzfs.conversion.errors import ConversionError
from stargzfs.conversion.forkserver import ForkServer
from stargzfs.errors import FormatError, UnsupportedError, UsageError
from stargzfs.estargz.codec import Codec

log = logging.getLogger(__name__)

CHUNK_SIZE = "0x400000"
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_MAX_ERROR_OUTPUT = 400
#: stargzfs-image's documented exit codes (stargzfs/errors.py) for input it will never accept:
#: retrying the same TOC cannot help, so these mean "not convertible", not "try again".
MALFORMED_STATUS = FormatError.exit_code
UNSUPPORTED_STATUS = UnsupportedError.exit_code


class BuilderFailed(ConversionError):
    """The builder exited non-zero; `status` and `last_line` say how (see run_builder)."""

    def __init__(self, message: str, *, status: int, last_line: str) -> None:
        super().__init__(message)
        self.status = status
        self.last_line = last_line


@dataclass(frozen=True)
class Builder:
    """How to run the nydus-image compatible builder.

    flavour: "stargzfs" (bundled, v2.1 CLI + `--compressor`), "v2.1" or "v2.2+" (external).
    """

    command: tuple[str, ...]
    flavour: str
    version: str
    memory_limit: int = 0  # bytes of address space (RLIMIT_AS); 0: no limit
    cpu_limit: int = 0  # seconds of CPU time (RLIMIT_CPU); 0: no limit
    server: ForkServer | None = field(default=None, compare=False, repr=False)  # warm forks (bundled only)

    @property
    def name(self) -> str:
        return "stargzfs-image" if self.flavour == "stargzfs" else f"nydus-image {self.version}"

    def converts(self, codec: Codec) -> bool:
        """nydus-image knows gzip eStargz only; the bundled builder every codec stargzfs reads."""
        return self.flavour == "stargzfs" or not codec.builder_args()

    def rejected_for_good(self, failure: BuilderFailed) -> bool:
        """Whether the builder said the TOC itself is unusable (then retrying cannot help)."""
        return self.flavour == "stargzfs" and failure.status in (MALFORMED_STATUS, UNSUPPORTED_STATUS)

    def create_argv(
        self, *, bootstrap: str, blob_id: str, blob_meta: str, toc: str, codec: Codec, blob_data_size: int,
        blob_index: str | None = None,
    ) -> list[str]:
        """The seed's exact argv (snapshotter §7), adapted to the builder's CLI generation;
        `blob_index` only reaches the bundled builder (a stargzfs extension)."""
        argv = [
            *self.command, "create", "--source-type", "stargz_index", "--bootstrap", bootstrap,
            "--blob-id", blob_id, "--repeatable", "--disable-check", "--fs-version", "6",
            "--chunk-size", CHUNK_SIZE,
        ]
        if self.flavour == "v2.2+":
            argv += ["--blob-data-size", f"0x{blob_data_size:x}"]
        else:
            argv += ["--blob-meta", blob_meta]
        if blob_index is not None and self.flavour == "stargzfs":
            argv += ["--blob-index", blob_index]
        return [*argv, *codec.builder_args(), toc]

    def merge_argv(self, *, bootstrap: str, sources: Sequence[str]) -> list[str]:
        return [*self.command, "merge", "--bootstrap", bootstrap, *sources]

    def limited(self, *, memory_mib: int, cpu_seconds: int) -> "Builder":
        """This builder under resource limits (the input it parses is untrusted)."""
        return replace(self, memory_limit=memory_mib << 20, cpu_limit=cpu_seconds)

    def warm(self) -> "Builder":
        """The bundled builder run by forking a process that imported it already (forkserver)."""
        if self.flavour != "stargzfs":
            return self
        return replace(self, server=ForkServer(_DEATH_SIGNAL))

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The full command line: die with the daemon, and stay within the limits.

        `setpriv --pdeathsig KILL`: a builder must not outlive a killed daemon and write late
        temps; `prlimit`: RLIMIT_AS/RLIMIT_CPU, set in the child, so a TOC built to exhaust
        memory or time fails its own conversion, not the daemon or the machine.
        """
        limits = []
        if self.memory_limit:
            limits.append(f"--as={self.memory_limit}")
        if self.cpu_limit:
            limits.append(f"--cpu={self.cpu_limit}")
        prefix = list(_DEATH_SIGNAL)
        if limits and _PRLIMIT:
            prefix += [_PRLIMIT, *limits, "--"]
        return [*prefix, *argv]

    def describe_exit(self, status: int) -> str:
        """Why a builder stopped, in words (a limit hit is named as such)."""
        if status == -signal.SIGXCPU:
            return f"hit its CPU limit of {self.cpu_limit} s"
        if status < 0:
            return f"was killed by {signal.Signals(-status).name}"
        return f"exited with status {status}"


def bundled_builder() -> Builder:
    """The venv's console script next to this interpreter, else `python -m stargzfs.image_cli`."""
    script = Path(sys.executable).parent / "stargzfs-image"
    if script.is_file() and os.access(script, os.X_OK):
        return Builder((str(script),), "stargzfs", "bundled")
    return Builder((sys.executable, "-m", "stargzfs.image_cli"), "stargzfs", "bundled")


def detect_builder(nydus_image: Path | None) -> Builder:
    """Resolve the configured builder and its CLI generation; UsageError if unusable."""
    if nydus_image is None:
        return bundled_builder()
    text = str(nydus_image)
    found = shutil.which(text) if "/" not in text else (text if os.access(text, os.X_OK) else None)
    if found is None:
        raise UsageError(f"nydus-image {text!r} is not an executable file (or not on PATH)")
    found = os.path.abspath(found)  # the daemon runs with cwd "/"
    try:
        done = subprocess.run(
            [found, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run {found} --version: {exc}") from None
    match = _VERSION.search(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or match is None:
        raise UsageError(f"{found} --version did not report a version (exit {done.returncode})")
    major, minor, patch = (int(part) for part in match.groups())
    version = f"v{major}.{minor}.{patch}"
    if (major, minor) == (2, 1):
        flavour = "v2.1"
    elif (major, minor) >= (2, 2):
        flavour = "v2.2+"
    else:
        raise UsageError(f"{found} is nydus-image {version}; stargz_index conversion needs v2.1 or later")
    log.info("builder: %s (%s CLI)", found, flavour)
    return Builder((found,), flavour, version)


_SETPRIV = shutil.which("setpriv")
_DEATH_SIGNAL: tuple[str, ...] = (_SETPRIV, "--pdeathsig", "KILL", "--") if _SETPRIV else ()
_PRLIMIT = shutil.which("prlimit")


async def run_builder(builder: Builder, argv: Sequence[str], pass_fds: Sequence[int], what: str) -> None:
    """Run one builder job; BuilderFailed with its last output line on failure."""
    log.debug("running %s", " ".join(argv))
    if builder.server is not None:
        try:
            status, output = await builder.server.run(
                argv[len(builder.command):], pass_fds, memory_limit=builder.memory_limit, cpu_limit=builder.cpu_limit
            )
        except OSError as exc:
            raise ConversionError(f"{what}: the builder did not run: {exc.strerror or exc}") from None
    else:
        status, output = await _subprocess(builder, argv, pass_fds, what)
    if status != 0:
        lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
        last = lines[-1].strip()[:_MAX_ERROR_OUTPUT] if lines else "(no output)"
        raise BuilderFailed(
            f"{what}: {Path(argv[0]).name} {builder.describe_exit(status)}: {last}", status=status, last_line=last,
        )
    if output.strip():
        log.debug("%s output: %s", what, output.decode("utf-8", "replace").strip()[:2000])


async def _subprocess(builder: Builder, argv: Sequence[str], pass_fds: Sequence[int], what: str) -> tuple[int, bytes]:
    """One process per job (an external nydus-image, or no fork server).

    Popen runs in the trio thread on purpose: PR_SET_PDEATHSIG fires when the *thread*
    that forked exits, and trio's worker threads come and go.
    """
    try:
        process = subprocess.Popen(
            builder.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds), close_fds=True,
        )
    except OSError as exc:
        raise ConversionError(f"{what}: cannot start {argv[0]}: {exc.strerror}") from None
    try:
        output, _ = await trio.to_thread.run_sync(process.communicate, abandon_on_cancel=True)
    except BaseException:
        process.kill()
        raise
    return process.returncode, output
