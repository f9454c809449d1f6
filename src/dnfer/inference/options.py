"""Defaults shared by the Python API and ``dnfer predict`` (no imports: the CLI parser reads them).

Each default lives here once; the API signatures and the CLI options refer to these names.
"""

from __future__ import annotations

#: Videos: classify every N-th frame (0, N, 2N, ...); the default of ``Predictor.predict``,
#: ``predict_iter``, ``annotate_video`` and ``dnfer predict --every``. At 25-30 fps that is
#: 5-6 classifications per second, faster than expressions change, at a fifth of the cost of
#: every frame. Annotated videos still show every frame (:mod:`dnfer.inference.video`).
VIDEO_EVERY = 5

#: ``--detector`` values; ``auto`` is MTCNN when facenet-pytorch is installed, else Haar.
DETECTORS = ("auto", "mtcnn", "haar", "yunet")
#: Default minimum confidence per detector. MTCNN's last stage already keeps boxes from 0.7;
#: 0.9 trades a few weak faces for fewer false boxes (none on the clips of docs/inference.md).
#: Haar has no confidence, only a vote count.
MTCNN_SCORE_THRESHOLD = 0.9
YUNET_SCORE_THRESHOLD = 0.7
