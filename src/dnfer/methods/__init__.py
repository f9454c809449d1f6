"""Training methods: one file each on :class:`dnfer.methods.base.Method`.

Importing this package registers every built-in method in ``METHODS`` and every threshold policy
in ``THRESHOLDS``.
"""

from dnfer.methods import ce, coteaching, dnfer, dnfer_plus, eac, gce, rul, sce, scn, thresholds  # noqa: F401
from dnfer.methods.base import Method, StepContext, StepResult, TrainBatch  # noqa: F401
