"""Helpers the tests share (not tests themselves): trained tiny models, processes, images, hosts.

Test modules and `conftest.py` import from here; nothing here imports `conftest.py` or a test
module. `REPO` is the checkout's root.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
