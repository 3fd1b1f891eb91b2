"""The `tfb` console script: tfb_core's commands plus `serve` (registered by this package)."""

from __future__ import annotations

import sys

from tfb_core.cli import main as core_main


def main(argv: list[str] | None = None) -> int:
    return core_main(argv)


if __name__ == "__main__":
    sys.exit(main())
