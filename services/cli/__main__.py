"""`python -m services.cli …` runs the `encore` command (used for child processes)."""

import sys

from services.cli import main

sys.exit(main())
