"""``python -m smalti`` (and ``torchrun -m smalti``) is the ``smalti`` command."""

import sys

from smalti.cli.main import main

sys.exit(main())
