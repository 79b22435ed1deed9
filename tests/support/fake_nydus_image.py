"""A fake `nydus-image` for tests of the external-builder path (we cannot install the real one).

`write_fake_nydus_image(dir, version=...)` writes an executable `dir/nydus-image` that:
- answers `--version` like nydus-image does (`Version: \tv2.1.6` …);
- checks its argv strictly against the form that version accepts: v2.1.x the seed's
  `create … --blob-meta META TOC`, v2.2+ `create … --blob-data-size 0xHEX TOC` (where
  `--blob-meta` is an error, as in the real v2.2) and `merge --bootstrap OUT SRC…`;
- appends one JSON line {"argv": [...], "ok": bool, "error": str} to `journal`;
- optionally sleeps after writing a partial output (to kill a daemon mid-conversion, or to
  keep a conversion in progress), then appends the same JSON line to `<journal>.woke`, so
  "this builder is still running" is `started - woken` (see `running_builds`);
- then runs the real `stargzfs-image` with the equivalent v2.1 argv, so outputs are genuine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_TEMPLATE = r'''#!{python}
import json, os, re, sys, time

VERSION = {version!r}
JOURNAL = {journal!r}
SLEEP = {sleep!r}
IMAGE_CLI = [{python!r}, "-m", "stargzfs.image_cli"]
MAJOR, MINOR = (int(x) for x in VERSION.lstrip("v").split(".")[:2])
V22 = (MAJOR, MINOR) >= (2, 2)

def journal(argv, ok, error=""):
    with open(JOURNAL, "a") as out:
        out.write(json.dumps({{"argv": argv, "ok": ok, "error": error}}) + "\n")

def fail(argv, message):
    journal(argv, False, message)
    print("error: " + message, file=sys.stderr)
    sys.exit(2)

def check_create(argv):
    fixed = ["create", "--source-type", "stargz_index", "--bootstrap", None, "--blob-id", None,
             "--repeatable", "--disable-check", "--fs-version", "6", "--chunk-size", "0x400000"]
    if len(argv) != len(fixed) + 3:
        fail(argv, f"expected {{len(fixed) + 3}} arguments, got {{len(argv)}}")
    for index, want in enumerate(fixed):
        if want is not None and argv[index] != want:
            fail(argv, f"argument {{index}} is {{argv[index]!r}}, expected {{want!r}}")
    bootstrap, blob_id = argv[4], argv[6]
    if not re.fullmatch(r"[0-9a-f]{{64}}", blob_id):
        fail(argv, "--blob-id is not 64 hex")
    if not os.path.basename(bootstrap).startswith("converting-stargz"):
        fail(argv, "--bootstrap is not a converting-stargz temp")
    flag, value, toc = argv[len(fixed)], argv[len(fixed) + 1], argv[len(fixed) + 2]
    if os.path.basename(toc) != "stargz.index.json":
        fail(argv, "the source is not stargz.index.json")
    if V22:
        if flag == "--blob-meta":
            fail(argv, "unexpected argument '--blob-meta' found")
        if flag != "--blob-data-size" or not re.fullmatch(r"0x[0-9a-f]+", value):
            fail(argv, "no value specified for '--blob-data-size'")
        if int(value, 16) <= 0:
            fail(argv, "--blob-data-size must be positive")
        return fixed_argv(argv, bootstrap, blob_id, None, toc)
    if flag != "--blob-meta" or os.path.basename(value) != blob_id + ".blob.meta":
        fail(argv, "expected --blob-meta <blob-id>.blob.meta")
    return fixed_argv(argv, bootstrap, blob_id, value, toc)

def fixed_argv(argv, bootstrap, blob_id, blob_meta, toc):
    out = ["create", "--source-type", "stargz_index", "--bootstrap", bootstrap, "--blob-id", blob_id,
           "--repeatable", "--disable-check", "--fs-version", "6", "--chunk-size", "0x400000"]
    if blob_meta is not None:
        out += ["--blob-meta", blob_meta]
    return out + [toc]

def check_merge(argv):
    if len(argv) < 4 or argv[1] != "--bootstrap":
        fail(argv, "expected merge --bootstrap OUT SOURCE...")
    if not os.path.basename(argv[2]).startswith("merging-stargz"):
        fail(argv, "--bootstrap is not a merging-stargz temp")
    for source in argv[3:]:
        if not re.fullmatch(r"[0-9a-f]{{64}}", os.path.basename(source)):
            fail(argv, f"merge source {{source!r}} is not named by its layer digest")
    return argv

def main():
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print(f"Version: \t{{VERSION}}\nGit Commit: \tfake\nBuild Time: \tnever\nProfile: \trelease")
        return 0
    if not argv:
        fail(argv, "no command")
    if argv[0] == "create":
        real = check_create(argv)
        bootstrap = argv[4]
    elif argv[0] == "merge":
        real = check_merge(argv)
        bootstrap = argv[2]
    else:
        fail(argv, f"unknown command {{argv[0]!r}}")
    journal(argv, True)
    if SLEEP:
        with open(bootstrap, "wb") as partial:
            partial.write(b"partial bootstrap")
        time.sleep(SLEEP)
        with open(JOURNAL + ".woke", "a") as out:
            out.write(json.dumps({{"argv": argv, "ok": True, "error": ""}}) + "\n")
    os.execv(IMAGE_CLI[0], IMAGE_CLI + real)

sys.exit(main())
'''


def write_fake_nydus_image(directory: Path, *, version: str = "v2.1.6", journal: Path, sleep: float = 0.0) -> Path:
    """Write `directory/nydus-image` (executable) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nydus-image"
    path.write_text(
        _TEMPLATE.format(python=sys.executable, version=version, journal=str(journal), sleep=float(sleep))
    )
    path.chmod(0o755)
    return path


def read_journal(journal: Path) -> list[dict]:
    """The fake's invocations, oldest first."""
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]


def running_builds(journal: Path) -> set[str]:
    """Blob ids of `create` runs that started and have not finished their sleep yet."""
    def blob_ids(path: Path) -> set[str]:
        return {call["argv"][6] for call in read_journal(path) if call["argv"][0] == "create"}

    return blob_ids(journal) - blob_ids(Path(f"{journal}.woke"))
