"""`stargzfs toc` end to end: ctr-remote images in a real docker-registry, counted by its access log."""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from stargzfs.cli import main
from stargzfs.estargz.gzip_codec import encode_footer as encode_gzip_footer
from support.images import FileSpec, PushedImage, build_image, upload_blob
from support.paths import NYDUS_FIXTURES, VENV_BIN
from support.registry import RegistryProcess

LAYER = [
    FileSpec("", "dir"),
    FileSpec("etc", "dir"),
    FileSpec("etc/hello.txt", data=b"hello from stargzfs\n"),
    FileSpec("etc/empty", data=b""),
    FileSpec("bin", "dir"),
    FileSpec("bin/data", data=bytes(range(256)) * 300, mode=0o755),
    FileSpec("bin/link", "symlink", target="data"),
]
LEGACY_BLOB = NYDUS_FIXTURES / "blobs" / "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"


@pytest.fixture(scope="module", params=["gzip", "zstd"])
def estargz_image(request, containerd, registry, image_cache) -> PushedImage:
    compression = request.param
    return image_cache.get(
        ("test_cli_toc", compression),
        lambda: build_image(containerd, registry, f"cli-toc/{compression}", [LAYER], compression=compression),
    )


@pytest.fixture(scope="module")
def plain_image(containerd, registry, image_cache) -> PushedImage:
    return image_cache.get(
        ("test_cli_toc", "plain"),
        lambda: build_image(containerd, registry, "cli-toc/plain", [LAYER], compression="plain"),
    )


def toc_inside(blob: bytes, compression: str) -> bytes:
    """The TOC JSON pulled out of a whole blob with stdlib/zstandard only (estargz.md §B6)."""
    if compression == "gzip":
        toc_offset = int(blob[-51:][16:32], 16)
        member = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[toc_offset:])
        with tarfile.open(fileobj=io.BytesIO(member)) as archive:
            extracted = archive.extractfile("stargz.index.json")
            assert extracted is not None
            return extracted.read()
    toc_offset = int.from_bytes(blob[-40:-32], "little")
    clen = int.from_bytes(blob[-32:-24], "little")
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob[toc_offset : toc_offset + clen])


def run_toc(registry: RegistryProcess, digest: str, *args: str, ref: str) -> tuple[int, int]:
    """(exit code, requests the registry saw for the whole command)."""
    since = registry.mark()
    code = main(["toc", ref, digest, *args])
    return code, len(registry.access_log()[since:])


def test_toc_written_verbatim_in_one_request(estargz_image: PushedImage, registry, tmp_path: Path) -> None:
    layer = estargz_image.layers[0]
    out = tmp_path / "stargz.index.json"
    code, requests = run_toc(
        registry, layer.digest, "-o", str(out), "--toc-digest", layer.toc_digest, ref=estargz_image.ref
    )
    assert (code, requests) == (0, 1)
    assert registry.requests_for(layer.digest)[-1].status == 206
    raw = out.read_bytes()
    assert raw == toc_inside(layer.blob(), estargz_image.compression)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == layer.toc_digest
    assert [p.name for p in tmp_path.iterdir()] == ["stargz.index.json"]  # no temp file left


def test_toc_larger_than_the_window_costs_two_requests(
    estargz_image: PushedImage, registry, capsys: pytest.CaptureFixture[str]
) -> None:
    layer = estargz_image.layers[0]
    code, requests = run_toc(registry, layer.digest, "--tail-size", "64", ref=estargz_image.ref)
    assert (code, requests) == (0, 2)
    line = capsys.readouterr().out.strip()
    kind = "estargz (gzip)" if estargz_image.compression == "gzip" else "zstd (zstd)"
    assert line.startswith(f"{layer.digest}: {kind}, ")
    assert f"{layer.toc_digest}, 2 requests" in line


def test_wrong_toc_digest_exits_7(estargz_image: PushedImage, registry, capsys) -> None:
    layer = estargz_image.layers[0]
    wrong = "sha256:" + "ab" * 32
    code, _ = run_toc(registry, layer.digest, "--toc-digest", wrong, ref=estargz_image.ref)
    assert code == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TOC digest mismatch" in err and layer.toc_digest in err


def test_plain_layer_exits_3_after_one_request(plain_image: PushedImage, registry, capsys) -> None:
    layer = plain_image.layers[0]
    code, requests = run_toc(registry, layer.digest, ref=plain_image.ref)
    assert (code, requests) == (3, 1)
    assert "not eStargz" in capsys.readouterr().err


def test_legacy_footer_blob_from_the_registry(registry, tmp_path: Path) -> None:
    digest = upload_blob(registry, "cli-toc/legacy", LEGACY_BLOB.read_bytes())
    out = tmp_path / "toc.json"
    code, requests = run_toc(registry, digest, "-o", str(out), ref=f"{registry.host}/cli-toc/legacy")
    assert (code, requests) == (0, 1)
    assert len(out.read_bytes()) == 5392 and b'"./lower/"' in out.read_bytes()


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda blob: blob[:-35] + b"zzzz" + blob[-31:], 5, "not 16 hex digits"),
        (lambda blob: blob[:-51] + encode_gzip_footer(len(blob) * 2), 5, "outside the blob"),
        (lambda blob: blob[:-51] + encode_gzip_footer(len(blob) - 200), 5, "gzip"),
        (lambda blob: blob[:-51] + b"\0" * 51, 3, "without an eStargz footer"),
        (lambda blob: blob[:-51] + bytes.fromhex("1f8b08040000000000ff1500") + b"SG\x11\x00STARGZEXTERNALTOC"
         + bytes.fromhex("010000ffff") + b"\0" * 8, 6, "external-TOC"),
        (lambda blob: b"\x1f" * 20, 3, "only 20 bytes"),
        (lambda blob: b"", 3, "only 0 bytes"),
    ],
    ids=["bad-hex", "offset-past-blob", "offset-into-garbage", "no-footer", "external-toc", "tiny", "empty"],
)
def test_broken_blobs_from_the_registry_exit_with_one_line(
    containerd, registry, image_cache, capsys, tmp_path: Path, mutate, code: int, message: str
) -> None:
    image = image_cache.get(
        ("test_cli_toc", "gzip"),
        lambda: build_image(containerd, registry, "cli-toc/gzip", [LAYER], compression="gzip"),
    )
    digest = upload_blob(registry, "cli-toc/broken", mutate(image.layers[0].blob()))
    out = tmp_path / "toc.json"
    actual, requests = run_toc(registry, digest, "-o", str(out), ref=f"{registry.host}/cli-toc/broken")
    err = capsys.readouterr().err
    assert (actual, err.count("\n")) == (code, 1)
    assert message in err and err.startswith("stargzfs toc: ")
    assert requests <= 2
    assert list(tmp_path.iterdir()) == []  # nothing partial written


def test_missing_blob_is_a_registry_error(registry, capsys) -> None:
    digest = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()
    code = main(["toc", f"{registry.host}/cli-toc/gzip", digest])
    err = capsys.readouterr().err
    assert (code, err.count("\n")) == (4, 1)
    assert "HTTP 404" in err and digest in err


def test_console_script_end_to_end(estargz_image: PushedImage, tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: JSON on stdout with `-o -`."""
    layer = estargz_image.layers[0]
    completed = subprocess.run(
        [str(VENV_BIN / "stargzfs"), "toc", estargz_image.ref, layer.digest, "-o", "-",
         "--toc-digest", layer.toc_digest],
        capture_output=True, timeout=60, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "sha256:" + hashlib.sha256(completed.stdout).hexdigest() == layer.toc_digest


def test_bad_arguments_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["toc", "127.0.0.1:1/x", "sha256:" + "0" * 64, "--tail-size", "-5"])
    assert exited.value.code == 2
    code = main(["toc", "127.0.0.1:1/x", "sha256:" + "0" * 64, "--toc-digest", "md5:abc"])
    assert code == 2
    assert "sha256:<64 hex>" in capsys.readouterr().err


def test_gzip_helper_sanity() -> None:
    """toc_inside must fail on a blob without a TOC, or the equality above proves nothing."""
    with pytest.raises(zlib.error, match="incorrect header check"):
        toc_inside(gzip.compress(b"x" * 100) + encode_gzip_footer(5), "gzip")


def test_registry_timeout_and_retries_flags(capsys) -> None:  # type: ignore[no-untyped-def]
    """A server that accepts but never answers: the flags bound each attempt and the attempts."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        code = main(["toc", f"{host}/some/repo", "sha256:" + "0" * 64,
                     "--registry-timeout", "0.3", "--registry-retries", "0"])
    assert code == 4
    err = capsys.readouterr().err
    assert "no answer within 0.3s" in err and "gave up after 1 attempts" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["toc", f"{host}/some/repo", "sha256:" + "0" * 64, "--registry-retries", "many"])
    assert exited.value.code == 2


def test_without_a_digest_every_layer_of_the_manifest_is_examined(
    estargz_image: PushedImage, plain_image: PushedImage, capsys
) -> None:
    assert main(["toc", estargz_image.ref]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(estargz_image.layers)
    for index, (line, layer) in enumerate(zip(lines, estargz_image.layers)):
        # the layer's toc.digest annotation was checked, as the snapshotter's label would be
        assert line.startswith(f"layer {index} {layer.digest}: ") and layer.toc_digest in line
    assert main(["toc", plain_image.ref]) == 0
    assert "not eStargz" in capsys.readouterr().out
    assert main(["toc", estargz_image.ref, "-o", "x.json"]) == 2  # which layer's TOC? a usage error
    assert "needs a DIGEST" in capsys.readouterr().err
