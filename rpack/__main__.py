"""`python -m rpack`: the same as the `rpack` command."""

import sys

from rpack.cli import main

sys.exit(main())
