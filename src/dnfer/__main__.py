"""``python -m dnfer`` (and ``torchrun -m dnfer train ...``)."""

import sys

from dnfer.cli import main

sys.exit(main())
