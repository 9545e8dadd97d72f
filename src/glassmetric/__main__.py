"""``python -m glassmetric``: the ``glassmetric`` command line."""

import sys

from glassmetric.cli import main

sys.exit(main())
