"""``python -m dnfer`` (and ``torchrun -m dnfer train ...``)."""

import sys

try:
    from dnfer.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while importing, or a third one during the cleanup
    code = 130
sys.exit(code)
