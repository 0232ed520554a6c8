"""`python -m drone_hf ...`: the `drone-hf` command."""

import sys

from .cli import main


sys.exit(main())
