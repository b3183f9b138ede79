"""On/off switches from the environment (KUBRICK_PDL, KUBRICK_GEMV_HALF, KUBRICK_PREFIX_CACHE), read one way.

No torch or Triton here: the engine reads its switches on machines without Triton too.
"""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_off(name: str) -> bool:
    """Whether environment variable `name` is 0 / false / no / off, in any case and with spaces around (unset: on)."""
    return os.environ.get(name, "1").strip().lower() in OFF
