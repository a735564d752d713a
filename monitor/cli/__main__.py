"""`python -m eigenwatch.monitor.cli ...` = `eigenwatch ...` (how child sidecars are started)."""

import sys

from .main import main

sys.exit(main())
