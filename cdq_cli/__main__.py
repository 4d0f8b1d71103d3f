"""``python -m cdq_cli`` runs the ``cdq`` command line."""

import sys

from .cli import main

sys.exit(main())
