"""``python -m wspool``: the same as the ``wspool`` command."""

import sys

from .cli import main

sys.exit(main())
