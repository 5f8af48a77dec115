"""What every result file records besides the numbers: harness version, date, and the generation settings."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def harness() -> dict:
    """allo's version, plus the git commit when running from a checkout (None elsewhere)."""
    import allo

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(allo.__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"harness": f"allo {allo.__version__}", "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
