"""`python -m qroar ...`: the `qroar` command where its console script is not installed."""

import sys

from qroar.cli import main

sys.exit(main())
