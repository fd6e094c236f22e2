"""``python -m fusegen``: the same as ``fusegen-cli``."""

import sys

from fusegen.cli import main

sys.exit(main())
