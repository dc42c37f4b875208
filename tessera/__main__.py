"""``python -m tessera`` (and ``torchrun -m tessera``) is the ``tessera`` command."""

import sys

from tessera.cli.main import main

sys.exit(main())
