"""``python -m devec_core decompose|inspect`` (see devec_core.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
