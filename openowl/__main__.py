"""`python -m openowl` = the `openowl` command."""

import sys

from openowl.cli import main

sys.exit(main())
