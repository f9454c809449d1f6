"""Make docs/img/predict_sample.jpg: scikit-image's astronaut photo run through ``dnfer predict``'s annotator.

Usage: .venv/bin/python docs/img/make_predict_sample.py CHECKPOINT OUT.jpg
"""

from __future__ import annotations

import sys

import cv2
from skimage import data

from dnfer.commands.predict import annotate
from dnfer.inference.predictor import load_predictor


def main(checkpoint: str, out: str) -> None:
    photo = data.astronaut()  # 512x512 RGB, public domain (NASA)
    pred = load_predictor(checkpoint, detector="haar").predict(photo)[0]
    cv2.imwrite(out, annotate(photo, pred), [cv2.IMWRITE_JPEG_QUALITY, 80])
    print(f"{len(pred.faces)} face(s): {[(f.label, round(f.confidence, 3), f.box) for f in pred.faces]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
