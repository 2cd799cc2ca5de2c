"""`python -m fwbw.study.launchers SWEEP ...`: a pull-worker on a prepared sweep
(fwbw.study.launchers.worker)."""

import sys

from fwbw.study.launchers.worker import main

sys.exit(main())
