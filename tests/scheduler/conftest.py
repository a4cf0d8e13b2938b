"""Fixtures of the scheduler tests (helpers live in sched_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# Let the test modules import sched_harness whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).parent))
