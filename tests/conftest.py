"""Test-wide settings. Fixtures live in tests/support/*.py, each loaded as a pytest plugin."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "nydus-v2.1.6-stargz"

pytest_plugins = sorted(
    f"support.{path.stem}" for path in (TESTS / "support").glob("*.py") if path.stem != "__init__"
)
