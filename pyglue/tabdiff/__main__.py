"""``python -m diffkern.tabdiff fit|sample|impute|evaluate`` (the same as ``diffkern tabdiff``)."""

import sys

from .cli import main

sys.exit(main())
