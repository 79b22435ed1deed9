"""Where the repository and the shared fixtures are (CI has shared/ beside the clone)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
NYDUS_FIXTURES = SHARED / "fixtures" / "nydus-v2.1.6-stargz"
VENV_BIN = Path(sys.executable).parent
