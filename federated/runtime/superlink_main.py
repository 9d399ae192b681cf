"""`flower-superlink` as we always run it: ``python -m federated.runtime.superlink_main ARGS``.

Adds `--disable-runtime-dependency-installation` when missing (the default runs `uv sync` on an
app's dependencies, which could pull packages from the internet, e.g. a CUDA torch) and turns
telemetry and update checks off before flwr is imported.
"""

from __future__ import annotations

import sys

from federated.runtime import flwr_internals
from federated.runtime.settings import disable_phone_home

NO_INSTALL_FLAG = "--disable-runtime-dependency-installation"


def main() -> None:
    disable_phone_home()
    if "--allow-runtime-dependency-installation" in sys.argv[1:]:
        raise SystemExit("superlink: runtime dependency installation is never allowed here")
    if NO_INSTALL_FLAG not in sys.argv[1:]:
        sys.argv.append(NO_INSTALL_FLAG)
    sys.argv[0] = "flower-superlink"
    flwr_internals.flower_superlink_main()


if __name__ == "__main__":
    main()
