"""Image reference normalisation (docker's rules) and the plain-http heuristic."""

from __future__ import annotations

import pytest

from stargzfs.errors import UsageError
from stargzfs.registry.reference import Reference, default_scheme, parse_reference

HEX_A = "a" * 64

NORMALISATION = [
    # input, registry, repository, tag, digest, str()
    ("nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io", "library/nginx", "1.25", None, "docker.io/library/nginx:1.25"),
    ("library/nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
    ("docker.io/nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
    ("index.docker.io/nginx", "docker.io", "library/nginx", "latest", None, "docker.io/library/nginx:latest"),
    ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
    ("ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1", None, "ghcr.io/org/app:v1"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("localhost:5000/a/b/c", "localhost:5000", "a/b/c", "latest", None, "localhost:5000/a/b/c:latest"),
    ("127.0.0.1:5000/x:t", "127.0.0.1:5000", "x", "t", None, "127.0.0.1:5000/x:t"),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None, "[::1]:5000/x:latest"),
    (f"nginx@sha256:{HEX_A}", "docker.io", "library/nginx", None, f"sha256:{HEX_A}",
     f"docker.io/library/nginx@sha256:{HEX_A}"),
    (f"reg.example:443/a:tag@sha256:{HEX_A}", "reg.example:443", "a", "tag", f"sha256:{HEX_A}",
     f"reg.example:443/a:tag@sha256:{HEX_A}"),
    ("my-reg.example.com/a_b/c-d.e__f:V1.0-rc_2", "my-reg.example.com", "a_b/c-d.e__f", "V1.0-rc_2", None,
     "my-reg.example.com/a_b/c-d.e__f:V1.0-rc_2"),
]


@pytest.mark.parametrize("text, registry, repository, tag, digest, normalised", NORMALISATION)
def test_normalisation_table(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, normalised: str
) -> None:
    ref = parse_reference(text)
    assert ref == Reference(registry, repository, tag, digest)
    assert str(ref) == normalised
    assert parse_reference(str(ref)) == ref  # the normal form is a fixed point


def test_api_host_is_registry_1_for_docker_hub() -> None:
    assert parse_reference("nginx").api_host == "registry-1.docker.io"
    assert parse_reference("ghcr.io/a/b").api_host == "ghcr.io"
    assert parse_reference("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("", "empty"),
        ("Nginx", "lower case"),
        ("docker.io/Library/nginx", "lower case"),
        ("nginx:", "invalid tag"),
        ("nginx:-bad", "invalid tag"),
        ("nginx@sha256:abc", "64 lower-case hex"),
        ("nginx@notadigest", "invalid digest"),
        (HEX_A, "image id"),
        ("a//b", "repository component ''"),
        ("nginx/", "repository component ''"),
        ("-bad.example/x", "invalid registry host"),
        ("ngi nx", "whitespace"),
        (":tag", "missing repository"),
        ("a/" + "b" * 260, "longer than 255"),
    ],
)
def test_invalid_references_are_usage_errors(text: str, complaint: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert complaint in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    "host, insecure, scheme",
    [
        ("localhost", (), "http"),
        ("localhost:5000", (), "http"),
        ("registry.localhost:5000", (), "http"),
        ("127.0.0.1:5000", (), "http"),
        ("127.10.20.30", (), "http"),
        ("[::1]:5000", (), "http"),
        ("10.1.2.3:5000", (), "http"),
        ("172.16.0.1", (), "http"),
        ("172.31.255.255:80", (), "http"),
        ("172.32.0.1", (), "https"),
        ("192.168.1.10:5000", (), "http"),
        ("192.169.1.10", (), "https"),
        ("8.8.8.8", (), "https"),
        ("registry-1.docker.io", (), "https"),
        ("ghcr.io", (), "https"),
        ("localhost.example.com", (), "https"),
        ("myreg.corp:5000", ("myreg.corp:5000",), "http"),
        ("myreg.corp:5000", ("myreg.corp",), "http"),
        ("myreg.corp:5000", ("other.corp",), "https"),
    ],
)
def test_default_scheme(host: str, insecure: tuple[str, ...], scheme: str) -> None:
    assert default_scheme(host, insecure) == scheme
