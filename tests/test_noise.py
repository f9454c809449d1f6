"""Noise protocols: seeded, correct realised rates, the right kind of flips; label-file round trip."""

from __future__ import annotations

import numpy as np
import pytest

from dnfer.data.classes import BASIC7
from dnfer.data.noise import (
    CONFUSABLE,
    apply_noise,
    asymmetric_matrix,
    pairflip_matrix,
    parse_noise_spec,
    read_label_file,
    symmetric_noise,
    transition_noise,
    write_label_file,
)
from dnfer.errors import ConfigError, DataError

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 7, size=20000)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_symmetric_rate_and_only_different_classes(rate: float) -> None:
    res = symmetric_noise(LABELS, rate=rate, num_classes=7, seed=3)
    # binomial std at n=20000 is < 0.0036; 5 sigma
    assert abs(res.realised_rate - rate) < 0.018
    assert (res.noisy_labels[res.is_noisy] != LABELS[res.is_noisy]).all()
    assert np.array_equal(res.is_noisy, res.noisy_labels != LABELS)
    # flipped-to classes uniform over the 6 others: each target share of flips from class 0 ~ 1/6
    src0 = (LABELS == 0) & res.is_noisy
    shares = np.bincount(res.noisy_labels[src0], minlength=7)[1:] / src0.sum()
    assert np.all(np.abs(shares - 1 / 6) < 0.06)


def test_seeded_and_seed_sensitive() -> None:
    a = symmetric_noise(LABELS, rate=0.3, num_classes=7, seed=1)
    b = symmetric_noise(LABELS, rate=0.3, num_classes=7, seed=1)
    c = symmetric_noise(LABELS, rate=0.3, num_classes=7, seed=2)
    assert np.array_equal(a.noisy_labels, b.noisy_labels)
    assert not np.array_equal(a.noisy_labels, c.noisy_labels)


def test_asymmetric_flips_only_to_confusable_partner() -> None:
    res = apply_noise(LABELS, "asymmetric:0.4", class_names=BASIC7, seed=0)
    for src, dst in zip(LABELS[res.is_noisy], res.noisy_labels[res.is_noisy], strict=True):
        assert BASIC7[dst] == CONFUSABLE[BASIC7[src]]
    assert abs(res.realised_rate - 0.4) < 0.02  # every basic class has a partner in BASIC7


def test_pairflip_moves_to_next_class() -> None:
    res = apply_noise(LABELS, "pairflip:0.2", class_names=BASIC7, seed=0)
    assert np.all(res.noisy_labels[res.is_noisy] == (LABELS[res.is_noisy] + 1) % 7)
    assert abs(res.realised_rate - 0.2) < 0.015


def test_transition_matrix_empirical_frequencies() -> None:
    t = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.1, 0.2, 0.7]])
    labels = np.repeat([0, 1, 2], 10000)
    res = transition_noise(labels, matrix=t, seed=5)
    for i in range(3):
        freq = np.bincount(res.noisy_labels[labels == i], minlength=3) / 10000
        assert np.allclose(freq, t[i], atol=0.02)
    with pytest.raises(ConfigError, match="sum to 1"):
        transition_noise(labels, matrix=np.ones((3, 3)), seed=0)


def test_matrices_are_row_stochastic() -> None:
    for m in (pairflip_matrix(7, 0.3), asymmetric_matrix(BASIC7, 0.3)):
        assert np.allclose(m.sum(1), 1.0) and (m >= 0).all()


def test_zero_rate_and_none_change_nothing() -> None:
    for spec in ("none", "symmetric:0"):
        res = apply_noise(LABELS, spec, class_names=BASIC7, seed=0)
        assert np.array_equal(res.noisy_labels, LABELS) and res.realised_rate == 0.0


@pytest.mark.parametrize("bad", ["symmetric", "symmetric:1.0", "symmetric:-0.1", "gaussian:0.2", "symmetric:abc"])
def test_malformed_specs_are_rejected_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_noise_spec(bad)
    assert bad.split(":")[0] in str(e.value) or "[0, 1)" in str(e.value)


def test_label_file_round_trip_is_one_based_raf_order(tmp_path) -> None:
    names = ["train_00001.jpg", "train_00002.jpg", "train_00003.jpg"]
    labels = np.array([0, 3, 6])  # surprise, happiness, neutral
    path = tmp_path / "EmoLabel" / "noise01.txt"
    write_label_file(path, names, labels, class_names=BASIC7)
    assert path.read_text().splitlines() == ["train_00001.jpg 1", "train_00002.jpg 4", "train_00003.jpg 7"]
    table = read_label_file(path)
    assert [table[n] for n in names] == ["surprise", "happiness", "neutral"]


def test_label_file_maps_by_name_for_other_class_orders(tmp_path) -> None:
    order = ["neutral", "happiness", "surprise"]  # AffectNet-like order
    path = tmp_path / "l.txt"
    write_label_file(path, ["a", "b"], np.array([0, 2]), class_names=order)
    assert path.read_text().split() == ["a", "7", "b", "1"]


@pytest.mark.parametrize(
    "content, message",
    [("a 1\nb\n", ":2"), ("a 9\n", "out of range"), ("a 1\na 2\n", "duplicate"), ("a x\n", ":1")],
)
def test_label_file_errors_name_the_line(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_label_file(path)
