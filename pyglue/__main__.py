"""``python -m diffkern ...``: the ``diffkern`` command line (diffkern.cli)."""

import sys

from diffkern.cli import main

sys.exit(main())
