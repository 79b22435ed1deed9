"""Test-wide settings. Fixtures live in tests/support/*.py, each loaded as a pytest plugin
(paths shared by tests and fixtures are in tests/support/paths.py)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = sorted(
    f"support.{path.stem}" for path in (Path(__file__).resolve().parent / "support").glob("*.py")
    if path.stem not in ("__init__", "paths")
)
