"""``python -m dnfer`` (and ``torchrun -m dnfer train ...``)."""

try:
    from dnfer.cli import entry
except KeyboardInterrupt:  # Ctrl-C while importing
    raise SystemExit(130) from None
entry()
