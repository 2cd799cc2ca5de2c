"""`python -m fwbw`: the same command line as the `fwbw` executable."""

import sys

from fwbw.cli import main

sys.exit(main())
