"""``python -m hladr.cli``: the same as the ``hladr`` command."""

import sys

from . import main

sys.exit(main())
