"""stargzfs.atomicio and every command that writes through it, on real full and read-only filesystems.

A 64 KiB tmpfs filled to the last page gives real ENOSPC from write/pwrite/fsync; a tmpfs
mounted read-only gives real EROFS from the temp file's creation. Either way each command
must print one line naming the output, exit 1, and leave the directory as it was.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stargzfs.atomicio import OutputError, atomic_output, open_output, write_atomically, write_files_atomically
from stargzfs.cli import main as stargzfs_main
from stargzfs.estargz.toc import parse_toc
from stargzfs.image_cli import main as image_main
from stargzfs.rafs.blobmeta import ChunkMeta, encode_blob_meta
from support.images import upload_blob
from support.paths import NYDUS_FIXTURES

LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
LOWER_TOC = NYDUS_FIXTURES / "stargz.index-lower.json"
LOWER_BLOB = NYDUS_FIXTURES / "blobs" / LOWER_ID
FILLER = "filler"
NO_SPACE = os.strerror(errno.ENOSPC)
READ_ONLY = os.strerror(errno.EROFS)


def _mount_tmpfs(target: Path, options: str) -> None:
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "stargzfs-test", str(target)], check=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs with no free block left (but free inodes: temp files get created)."""
    target = tmp_path / "full"
    _mount_tmpfs(target, "size=64k,mode=0755")
    try:
        fd = os.open(target / FILLER, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, b"\xaa" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield target
    finally:
        _umount(target)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "readonly"
    _mount_tmpfs(target, "ro,size=64k")
    try:
        yield target
    finally:
        _umount(target)


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def assert_one_line_failure(err: str, output: Path, reason: str) -> None:
    assert err.count("\n") == 1, err
    assert f"cannot write {output}: {reason}" in err, err
    assert "Traceback" not in err


# --- the helper itself ---------------------------------------------------------------------------


def test_write_replaces_whole_file_with_umask_applied(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old and longer content")
    old_umask = os.umask(0o027)
    try:
        write_atomically(target, b"new")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert _listing(tmp_path) == {"out"}


def test_failing_stream_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as handle:
            handle.pwrite(b"partial", 4096)
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous" and _listing(tmp_path) == {"out"}


def test_several_files_all_or_nothing(tmp_path: Path, full_dir: Path) -> None:
    """The first target's temp is written, the second cannot be: neither target changes."""
    first = tmp_path / "first"
    first.write_bytes(b"keep me")
    with pytest.raises(OutputError) as caught:
        write_files_atomically([(first, b"new first"), (full_dir / "second", b"x" * 8192)])
    assert caught.value.exit_code == 1 and NO_SPACE in str(caught.value)
    assert first.read_bytes() == b"keep me"
    assert _listing(tmp_path) == {"first", "full"} and _listing(full_dir) == {FILLER}


def test_a_temp_written_in_place_is_renamed_in_its_turn_or_removed(tmp_path: Path, full_dir: Path) -> None:
    """open_output's temp (filled through a mapping by `create`) joins the all-or-nothing set."""
    prepared = open_output(tmp_path / "boot")
    os.pwrite(prepared.fileno(), b"mapped bytes", 0)
    with pytest.raises(OutputError) as caught:
        write_files_atomically([(full_dir / "meta", b"x" * 8192), prepared])
    assert NO_SPACE in str(caught.value) and prepared.closed
    assert _listing(tmp_path) == {"full"} and _listing(full_dir) == {FILLER}

    prepared = open_output(tmp_path / "boot")
    os.pwrite(prepared.fileno(), b"mapped bytes", 0)
    write_files_atomically([(tmp_path / "meta", b"meta"), prepared])
    assert (tmp_path / "boot").read_bytes() == b"mapped bytes" and (tmp_path / "meta").read_bytes() == b"meta"
    assert _listing(tmp_path) == {"boot", "full", "meta"}


def test_helper_errors_are_one_line_output_errors(full_dir: Path, readonly_dir: Path) -> None:
    with pytest.raises(OutputError, match=f"cannot write {full_dir / 'x'}: {NO_SPACE}$"):
        write_atomically(full_dir / "x", b"y" * 5000)
    with pytest.raises(OutputError, match=f"cannot write {readonly_dir / 'x'}: {READ_ONLY}$"):
        write_atomically(readonly_dir / "x", b"y")
    assert _listing(full_dir) == {FILLER} and _listing(readonly_dir) == set()


# --- every writing command: disk full and read-only → one line, exit 1, nothing left -------------


def _create(out_dir: Path) -> tuple[int, Path]:
    out = out_dir / "image.boot"
    argv = ["create", "--source-type", "stargz_index", "--bootstrap", str(out), "--blob-id", LOWER_ID,
            "--repeatable", "--disable-check", "--fs-version", "6", "--blob-meta", str(out_dir / "meta"),
            str(LOWER_TOC)]
    # the bootstrap's temp is opened and its blocks claimed (posix_fallocate) before the build
    # writes into it through a mapping, so it is the one named
    return image_main(argv), out


@pytest.fixture(scope="module")
def layer_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("atomicio-layer")
    source = directory / LOWER_ID
    assert _create(directory)[0] == 0
    (directory / "image.boot").rename(source)
    return source


def _merge(out_dir: Path, source: Path) -> tuple[int, Path]:
    out = out_dir / "image.boot"
    return image_main(["merge", "--bootstrap", str(out), str(source)]), out


def _materialize(out_dir: Path, scratch: Path) -> tuple[int, Path]:
    toc = parse_toc(LOWER_TOC.read_bytes())
    chunks, next_offset = [], 0
    for entry in toc.entries:
        for chunk in entry.chunks:
            chunks.append(ChunkMeta(next_offset, chunk.size, chunk.offset, 0))
            next_offset += (chunk.size + 4095) // 4096 * 4096
    meta = scratch / "lower.blob.meta"
    meta.write_bytes(encode_blob_meta(chunks))
    out = out_dir / "lower.dev"
    return image_main(["materialize", "--blob-meta", str(meta), "--blob", str(LOWER_BLOB), "-o", str(out)]), out


@pytest.mark.parametrize("command", ["create", "merge", "materialize", "check"])
@pytest.mark.parametrize("where", ["full", "readonly"])
def test_image_commands_fail_cleanly(
    command: str, where: str, layer_bootstrap: Path, tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_dir: Path = request.getfixturevalue("full_dir" if where == "full" else "readonly_dir")
    before = _listing(out_dir)
    if command == "create":
        code, named = _create(out_dir)
    elif command == "merge":
        code, named = _merge(out_dir, layer_bootstrap)
    elif command == "materialize":
        code, named = _materialize(out_dir, tmp_path)
    else:
        named = out_dir / "report.json"
        code = image_main(["check", "-B", str(layer_bootstrap), "-J", str(named)])
    assert code == 1
    assert_one_line_failure(capsys.readouterr().err, named, NO_SPACE if where == "full" else READ_ONLY)
    assert _listing(out_dir) == before


@pytest.mark.parametrize("where", ["full", "readonly"])
def test_toc_output_fails_cleanly(
    where: str, registry, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    out_dir: Path = request.getfixturevalue("full_dir" if where == "full" else "readonly_dir")
    before = _listing(out_dir)
    digest = upload_blob(registry, "atomicio/legacy", LOWER_BLOB.read_bytes())
    out = out_dir / "toc.json"
    assert stargzfs_main(["toc", f"{registry.host}/atomicio/legacy", digest, "-o", str(out)]) == 1
    assert_one_line_failure(capsys.readouterr().err, out, NO_SPACE if where == "full" else READ_ONLY)
    assert _listing(out_dir) == before
