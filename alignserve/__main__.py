"""`python -m alignserve` is the `alignserve` command."""

import sys

from alignserve.cli import main

sys.exit(main())
