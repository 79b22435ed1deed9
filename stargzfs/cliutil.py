"""What the console scripts share: sub-command modules, one-line errors, common options."""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from stargzfs.errors import StargzfsError


def _positive_number(unit: str) -> Callable[[str], float]:
    """An argparse type for a positive, finite number of `unit`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of {unit}")
        return value

    return parse


positive_seconds = _positive_number("seconds")
positive_rate = _positive_number("bytes per second")


def non_negative_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def path_argument(text: str) -> Path:
    """A path from the command line; a NUL byte can never name a file."""
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte")
    return Path(text)


# The registry defaults every command shares (= RegistryConfig's, which `--help` must not import).
DEFAULT_AUTH_TIMEOUT = 10.0
DEFAULT_MIN_RATE = 16 * 1024.0
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"


def add_registry_options(
    parser: argparse.ArgumentParser,
    *,
    timeout: float,
    retries: int,
    timeout_aliases: Sequence[str] = (),
    from_settings: bool = False,
) -> None:
    """Registry options, the same for every command. `from_settings`: leave unset options None so
    a config file can supply them (`stargzfs mount`); the defaults shown are the effective ones."""

    def default(value: float) -> float | None:
        return None if from_settings else value

    # With settings, a value is checked (and named in errors) by MountSettings.validated, the
    # same as when it comes from a config file.
    seconds, count, rate = (float, int, float) if from_settings else (positive_seconds, non_negative_int, positive_rate)

    parser.add_argument(
        "--insecure-registry", metavar="HOST", action="append", default=[],
        help="talk plain HTTP to HOST[:PORT] (repeatable; localhost and private IPs need not be listed)",
    )
    parser.add_argument(
        "--hosts-dir", metavar="DIR", type=path_argument, default=None,
        help="containerd hosts directory: <registry>/hosts.toml names mirrors, CAs, client certificates "
        f"(default {DEFAULT_HOSTS_DIR} when it exists)",
    )
    parser.add_argument(
        "--registry-timeout", *timeout_aliases, dest="registry_timeout", metavar="SECONDS",
        type=seconds, default=default(timeout),
        help="seconds to wait for a registry answer and for each gap in its body, per attempt "
        f"(default {timeout:g}); a slow link only needs data to keep flowing",
    )
    parser.add_argument(
        "--registry-retries", metavar="N", type=count, default=default(retries),
        help=f"extra attempts after a failed registry request (default {retries})",
    )
    parser.add_argument(
        "--registry-min-rate", metavar="BYTES_PER_S", type=rate, default=default(DEFAULT_MIN_RATE),
        help="slowest transfer accepted: a request must end within timeout + size / rate "
        f"(default {DEFAULT_MIN_RATE:g})",
    )
    parser.add_argument(
        "--auth-timeout", metavar="SECONDS", type=seconds, default=default(DEFAULT_AUTH_TIMEOUT),
        help=f"limit for one token request to the registry's auth realm (default {DEFAULT_AUTH_TIMEOUT:g})",
    )


def registry_config(args: argparse.Namespace, extra_insecure: Sequence[str] = ()) -> Any:
    """The RegistryConfig of a one-shot command's registry options (imported here: `--help` stays cheap)."""
    from stargzfs.registry import RegistryConfig
    from stargzfs.registry.hosts import default_hosts_dir
    from stargzfs.registry.reference import validate_registry_host

    insecure = [validate_registry_host(host, "--insecure-registry") for host in args.insecure_registry]
    return RegistryConfig(
        insecure_hosts=tuple(insecure) + tuple(extra_insecure),
        timeout=args.registry_timeout,
        retries=args.registry_retries,
        auth_timeout=args.auth_timeout,
        min_rate=args.registry_min_rate,
        hosts_dir=args.hosts_dir if args.hosts_dir is not None else default_hosts_dir(),
    )


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line naming what was wrong, exit 2 (argparse adds the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())}\n")


def build_parser(prog: str, description: str, version: str, modules: Iterable[ModuleType]) -> argparse.ArgumentParser:
    """A parser whose sub-commands come from modules exposing register(subparsers)."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules:
        module.register(sub)
    return parser


def build_lazy_parser(
    prog: str, description: str, version: str, commands: Mapping[str, str], argv: Sequence[str] | None
) -> argparse.ArgumentParser:
    """`build_parser` importing only the module of the sub-command `argv` names (`commands`
    maps command names to module paths). Start-up time counts: the snapshotter runs the
    builder once per layer, and `stargzfs mount-image` is on the path to an image's first
    byte; `--help` and unknown commands still list them all."""
    words = sys.argv[1:] if argv is None else argv
    requested = next((word for word in words if not word.startswith("-")), None)
    wanted = [commands[requested]] if requested in commands else list(dict.fromkeys(commands.values()))
    return build_parser(prog, description, version, [importlib.import_module(path) for path in wanted])


# A process that ends with os._exit once its command returns (the stargzfs-image console
# script, a fork-server job) need not free a large result object by object: a million-node
# tree takes a third of a second to free, 3-5% of a build. Commands hand such results to
# keep_until_exit; anywhere else (tests calling main() in-process) it keeps nothing.
_exits_without_teardown = False
_kept_until_exit: list[object] = []


def exit_without_teardown() -> None:
    """Promise that this process ends with `exit_now` (or os._exit) after its command."""
    global _exits_without_teardown
    _exits_without_teardown = True


def keep_until_exit(value: object) -> None:
    """Keep `value` alive until the process exits, when it is about to exit anyway.

    Also out of the cyclic GC's sight (gc.freeze): the first collection after a build
    turns the GC back on would otherwise walk every object the build made, once, for
    nothing (20 ms of a 100k-entry create)."""
    if _exits_without_teardown:
        _kept_until_exit.append(value)
        gc.freeze()


def exit_now(code: int, prog: str) -> NoReturn:
    """Flush stdout/stderr and end the process without freeing its objects. Only after
    every output is complete: no atexit handler or finaliser runs.

    Output that cannot be flushed is not lost silently: a reader that left ends it like
    SIGPIPE would (141, as `run` does), any other failure (a full disk behind `> file`)
    with a line on stderr and 120, the interpreter's own status for it."""
    try:
        if sys.stdout is not None:  # None: started with fd 1 closed
            sys.stdout.flush()
    except BrokenPipeError:
        code = 141
    except (OSError, ValueError) as exc:  # ValueError: stdout was closed
        _say_on_stderr(f"{prog}: cannot write standard output: {exc}")
        code = 120
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):
        pass  # nowhere left to report it
    os._exit(code)


def _say_on_stderr(line: str) -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.write(line + "\n")
    except (OSError, ValueError):
        pass


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Expected failures become one line on stderr and their documented exit code."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StargzfsError as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        # e.g. a builder under the mount's RLIMIT_AS given a TOC built to exhaust memory
        print(f"{parser.prog} {args.command}: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `stargzfs-image inspect B ls / | head`: the reader left; exit like SIGPIPE would,
        # without a traceback, and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


class ProgressBar:
    """`[#####.....] 12.0 MiB / 40.0 MiB  30%` redrawn in place on a terminal's stderr."""

    WIDTH = 30

    def __init__(self, stream: Any, min_interval: float = 0.1) -> None:
        self._stream = stream
        self._min_interval = min_interval
        self._last_draw = 0.0
        self._drawn = False

    @classmethod
    def for_stderr(cls, *, quiet: bool) -> "ProgressBar | None":
        """A bar only where someone watches: stderr is a terminal and --quiet was not given."""
        if quiet or not sys.stderr.isatty():
            return None
        return cls(sys.stderr)

    def update(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if done < total and now - self._last_draw < self._min_interval:
            return
        self._last_draw = now
        fraction = done / total if total > 0 else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self._stream.write(f"\r[{bar}] {human_bytes(done)} / {human_bytes(total)} {fraction:4.0%}")
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
