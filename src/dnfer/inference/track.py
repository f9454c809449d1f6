"""Face track ids across video frames: greedy IoU matching with constant-velocity prediction.

Deliberately small (no appearance model, no Kalman filter): each track remembers its last box
and its last per-step displacement; on the next sampled frame every track's box is predicted
one step ahead, all (track, detection) pairs are ranked by IoU, and pairs are taken greedily
from the highest IoU down, each track and detection at most once, if the IoU is at least
``min_iou``. A detection left over starts a new track (ids 1, 2, ... per video); a track left
over counts a miss and is dropped after ``max_missed`` consecutive misses, so a face that
comes back later gets a new id.

The velocity term keeps ids on two faces whose boxes slide past each other slowly: each
track's predicted box overlaps its own next detection more than the other face's.
"""

from __future__ import annotations

from dataclasses import dataclass

Box = tuple[float, float, float, float]  # (x, y, w, h) in pixels

#: A detection continues a track only if it overlaps the track's predicted box at least this much.
TRACK_MIN_IOU = 0.3
#: A track survives this many consecutive sampled frames without a matching detection.
TRACK_MAX_MISSED = 3


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes (0 for empty boxes)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@dataclass
class _Track:
    id: int
    box: Box
    velocity: tuple[float, float] = (0.0, 0.0)  # per sampled frame, of the box centre
    missed: int = 0

    def predicted(self) -> Box:
        steps = self.missed + 1
        x, y, w, h = self.box
        return (x + self.velocity[0] * steps, y + self.velocity[1] * steps, w, h)


class IoUTracker:
    """Stable integer ids for the boxes of consecutive (sampled) frames of one video.

    Args:
        min_iou: smallest IoU between a track's predicted box and a detection to continue it.
        max_missed: consecutive frames without a match after which a track is dropped.
    """

    def __init__(self, min_iou: float = TRACK_MIN_IOU, max_missed: int = TRACK_MAX_MISSED) -> None:
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"min_iou must be in (0, 1], got {min_iou}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        self.min_iou = min_iou
        self.max_missed = max_missed
        self._tracks: list[_Track] = []
        self._next_id = 1

    def update(self, boxes: list[Box]) -> list[int]:
        """Match one frame's boxes to the tracks; returns one id per box, in the order given."""
        predicted = [t.predicted() for t in self._tracks]
        pairs = sorted(
            ((iou(p, b), ti, bi) for ti, p in enumerate(predicted) for bi, b in enumerate(boxes)),
            key=lambda v: (-v[0], v[1], v[2]),
        )
        ids: list[int | None] = [None] * len(boxes)
        matched: set[int] = set()
        for score, ti, bi in pairs:
            if score < self.min_iou:
                break
            if ti in matched or ids[bi] is not None:
                continue
            t = self._tracks[ti]
            old_c = (t.box[0] + t.box[2] / 2, t.box[1] + t.box[3] / 2)
            b = boxes[bi]
            steps = t.missed + 1
            t.velocity = ((b[0] + b[2] / 2 - old_c[0]) / steps, (b[1] + b[3] / 2 - old_c[1]) / steps)
            t.box, t.missed = tuple(float(v) for v in b), 0  # type: ignore[assignment]
            ids[bi] = t.id
            matched.add(ti)
        survivors = []
        for ti, t in enumerate(self._tracks):
            if ti not in matched:
                t.missed += 1
                if t.missed > self.max_missed:
                    continue
            survivors.append(t)
        self._tracks = survivors
        for bi, b in enumerate(boxes):
            if ids[bi] is None:
                t = _Track(self._next_id, tuple(float(v) for v in b))  # type: ignore[arg-type]
                self._next_id += 1
                self._tracks.append(t)
                ids[bi] = t.id
        return [int(i) for i in ids]  # type: ignore[arg-type]
