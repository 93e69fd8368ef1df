"""``python -m gnnumba ...``: the ``gnnumba`` command (``bench``, ``check``, ``warmup``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
