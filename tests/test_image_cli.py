"""`stargzfs-image create/check/inspect` argv handling: the seed's exact command line in any
order, one-line errors with distinct exit codes, and never a partial or stray output file."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stargzfs.errors import StargzfsError
from stargzfs import cliutil
from stargzfs.image_cli import main
from support.toc_cases import REJECTIONS
from support.paths import NYDUS_FIXTURES, VENV_BIN

LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
EMPTY_ID = "db30bb2870067ed3e0e73c7448d9f0b529169da8295b5b5155b417624d861d81"
LOWER_TOC = NYDUS_FIXTURES / "stargz.index-lower.json"


def seed_argv(out: Path, meta: Path, toc: Path, blob_id: str = LOWER_ID) -> list[str]:
    return ["create", "--source-type", "stargz_index", "--bootstrap", str(out), "--blob-id", blob_id,
            "--repeatable", "--disable-check", "--fs-version", "6", "--chunk-size", "0x400000",
            "--blob-meta", str(meta), str(toc)]


def test_seed_command_line_via_console_script(tmp_path: Path) -> None:
    out, meta = tmp_path / "boot", tmp_path / "meta"
    proc = subprocess.run([str(VENV_BIN / "stargzfs-image"), *seed_argv(out, meta, LOWER_TOC)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == 20480 and meta.stat().st_size == 8192
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot", "meta"]


def test_console_script_ends_without_teardown_yet_loses_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script ends with os._exit, so the built tree is never freed object by
    object: what it printed must still all arrive, its exit codes are main()'s, and callers
    of main() in this process keep nothing alive."""
    toc = tmp_path / "toc.json"
    toc.write_bytes(json.dumps({"version": 1, "entries": [
        {"name": f"dir/file-{i:05d}", "type": "reg", "mode": 0o644} for i in range(3000)
    ]}).encode())
    boot = tmp_path / ("b" * 64)
    frozen = gc.get_freeze_count()
    assert main(seed_argv(boot, tmp_path / "meta", toc, "b" * 64)) == 0
    assert cliutil._kept_until_exit == []
    assert gc.get_freeze_count() == frozen  # hidden from the cyclic GC only in a process about to exit
    capsys.readouterr()
    assert main(["inspect", str(boot), "ls", "/dir"]) == 0
    expected = capsys.readouterr().out
    assert expected.count("\n") >= 3000
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    printed = subprocess.run([str(VENV_BIN / "stargzfs-image"), "inspect", str(boot), "ls", "/dir"],
                             capture_output=True, text=True, env=buffered)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == expected  # a pipe: block-buffered, flushed before os._exit
    with open("/dev/full", "w") as full:  # output that cannot be flushed is not a silent success
        lost = subprocess.run([str(VENV_BIN / "stargzfs-image"), "inspect", str(boot), "ls", "/"],  # < a buffer
                              stdout=full, stderr=subprocess.PIPE, text=True, env=buffered)
    assert lost.returncode == 120 and "stargzfs-image: cannot write standard output" in lost.stderr
    toc.write_bytes(b'{"version": 1, "entries": [{"name": "x", "type": "reg", "size": -1}]}')
    refused = subprocess.run([str(VENV_BIN / "stargzfs-image"), *seed_argv(tmp_path / "out", tmp_path / "m", toc)],
                             capture_output=True, text=True)
    assert refused.returncode == 5 and "'size'" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_flag_order_and_checked_build_give_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert main(seed_argv(a / "boot", a / "meta", LOWER_TOC)) == 0
    shuffled = ["create", str(LOWER_TOC), "--chunk-size", "400000", "--blob-meta", str(b / "meta"),
                "--fs-version", "6", "--repeatable", "--blob-id", LOWER_ID, "--bootstrap", str(b / "boot"),
                "--source-type", "stargz_index"]  # no --disable-check: runs check too
    assert main(shuffled) == 0
    assert (a / "boot").read_bytes() == (b / "boot").read_bytes()
    assert (a / "meta").read_bytes() == (b / "meta").read_bytes()


def test_empty_layer_writes_no_blob_meta(tmp_path: Path) -> None:
    out, meta = tmp_path / "boot", tmp_path / "meta"
    assert main(seed_argv(out, meta, NYDUS_FIXTURES / "stargz.index-empty.json", EMPTY_ID)) == 0
    assert out.stat().st_size == 8192 and not meta.exists()


@pytest.mark.parametrize("change, code, words", [
    ({"--fs-version": "5"}, 2, "--fs-version '5' is not supported"),
    ({"--source-type": "directory"}, 2, "only stargz_index"),
    ({"--chunk-size": "0x3000"}, 2, "power of two"),
    ({"--chunk-size": "zz"}, 2, "not a hexadecimal"),
    ({"--chunk-size": "0x100000"}, 6, "does not match --chunk-size"),
    ({"--blob-id": "xyz"}, 2, "64 lowercase hex"),
])
def test_bad_arguments(change: dict[str, str], code: int, words: str, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = seed_argv(tmp_path / "boot", tmp_path / "meta", LOWER_TOC)
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = value
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_toc_leaves_previous_outputs_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, meta = tmp_path / "boot", tmp_path / "meta"
    out.write_bytes(b"old bootstrap")
    bad = tmp_path / "toc.json"
    bad.write_text('{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5, "offset": 9},'
                   ' {"name": "b", "type": "reg", "size": 5, "offset": 9, "innerOffset": 7}]}')
    assert main(seed_argv(out, meta, bad)) == 6
    assert "innerOffset" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(seed_argv(out, meta, bad)) == 5
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text("")  # nothing to map: read instead, and the same error
    assert main(seed_argv(out, meta, bad)) == 5
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text('{"version": 1, "entries": [{"name": "d", "type": "dir"}, {"name": "d/a", "type": "reg", "size": "5"}]}')
    assert main(seed_argv(out, meta, bad)) == 5  # the error is worked out from the mapped bytes again
    assert "entry #1 ('d/a'): 'size'" in capsys.readouterr().err
    assert main(seed_argv(out, meta, tmp_path / "missing.json")) == 2
    assert out.read_bytes() == b"old bootstrap" and not meta.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot", "toc.json"]


def test_missing_output_directory_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output problem is exit 1 (README); 2 stays for missing/unreadable INPUT files."""
    assert main(seed_argv(tmp_path / "nodir" / "boot", tmp_path / "meta", LOWER_TOC)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'meta'}" not in err  # META's temp was written and discarded
    assert f"cannot write {tmp_path / 'nodir' / 'boot'}: No such file or directory" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_check_report_into_a_missing_directory_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, meta = tmp_path / "boot", tmp_path / "meta"
    assert main(seed_argv(out, meta, LOWER_TOC)) == 0
    capsys.readouterr()
    assert main(["check", "-B", str(out), "-J", str(tmp_path / "nodir" / "report.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "report.json: No such file or directory" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot", "meta"]


def test_zstd_compressor_extension(tmp_path: Path) -> None:
    argv = seed_argv(tmp_path / "boot", tmp_path / "meta", LOWER_TOC) + ["--compressor", "zstd"]
    assert main(argv) == 0
    assert main(["inspect", str(tmp_path / "boot"), "stats", "--json"]) == 0


def test_check_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, meta = tmp_path / f"{LOWER_ID}.boot", tmp_path / f"{LOWER_ID}.blob.meta"
    assert main(seed_argv(out, meta, LOWER_TOC)) == 0
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["check", "--bootstrap", str(out), "--blob-meta", str(meta), "-J", str(report), "-V"]) == 0
    assert "check: OK" in capsys.readouterr().out
    assert json.loads(report.read_text())["blobs"] == [LOWER_ID]

    assert main(["inspect", str(out), "ls", "/sub", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listing][:2] == ["more", "some"]
    assert main(["inspect", str(out), "stat", "/root-large"]) == 0
    assert "nlink: 2" in capsys.readouterr().out
    assert main(["inspect", str(out), "chunks", "/root-large", "--json"]) == 0
    assert [c["compressed_offset"] for c in json.loads(capsys.readouterr().out)] == [247, 4356, 8465, 12574]
    assert main(["inspect", str(out), "blobs"]) == 0
    assert LOWER_ID in capsys.readouterr().out
    assert main(["inspect", str(out), "stat", "/nope"]) == 2
    assert main(["inspect", str(out), "ls"]) == 2

    damaged = tmp_path / "damaged.boot"
    shutil.copy(out, damaged)
    with damaged.open("r+b") as handle:
        handle.truncate(6000)
    capsys.readouterr()
    assert main(["check", "--bootstrap", str(damaged)]) == 5
    err = capsys.readouterr().err
    assert "check(s) failed" in err and err.count("\n") == 1
    assert main(["inspect", str(damaged), "stats"]) == 5


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`inspect … | head` must not end in a BrokenPipeError traceback."""
    toc = tmp_path / "toc.json"
    toc.write_bytes(json.dumps({"version": 1, "entries": [
        {"name": f"f{i:05d}", "type": "reg", "mode": 0o644} for i in range(3000)
    ]}).encode())
    boot = tmp_path / ("a" * 64)
    create = [sys.executable, "-m", "stargzfs.image_cli", "create", "--source-type", "stargz_index",
              "--bootstrap", str(boot), "--blob-id", "a" * 64, "--fs-version", "6", str(toc)]
    subprocess.run(create, check=True)
    pipeline = subprocess.run(
        f"{sys.executable} -m stargzfs.image_cli inspect {boot} ls / | head -n 1",
        shell=True, capture_output=True, text=True,
    )
    assert pipeline.stdout.count("\n") == 1
    assert "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr


@pytest.mark.parametrize("raw, error, words", [(r[3], r[1], r[2]) for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
def test_every_rejection_through_the_cli(raw: bytes, error: type[StargzfsError], words: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """What the pipeline sees: the error's exit code, one stderr line, and no OUT or META at all."""
    toc = tmp_path / "toc.json"
    toc.write_bytes(raw)
    out, meta = tmp_path / "out" / "boot", tmp_path / "out" / "meta"
    out.parent.mkdir()
    assert main(seed_argv(out, meta, toc)) == error.exit_code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []
