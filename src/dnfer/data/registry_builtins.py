"""Importing this module registers every built-in dataset loader in ``DATASETS``."""

import dnfer.data.affectnet  # noqa: F401
import dnfer.data.csvfile  # noqa: F401
import dnfer.data.fer2013  # noqa: F401
import dnfer.data.folder  # noqa: F401
import dnfer.data.rafdb  # noqa: F401
from dnfer.data import synthetic  # noqa: F401
