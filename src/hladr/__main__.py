"""``python -m hladr``: the same as the ``hladr`` command."""

import sys

from .cli import main

sys.exit(main())
