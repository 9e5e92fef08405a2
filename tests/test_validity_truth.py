"""The corpus's own truth measurements (benchmarks/validity/common.py), checked against an
independent implementation."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.validity.common import knn_accuracy


def test_knn_accuracy_matches_scikit_learn_cosine_vote():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    y = rng.integers(0, 4, 400)
    f = centres[y] + 0.8 * rng.normal(size=(400, 6))
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(f[:300], y[:300])
    expected = float((ref.predict(f[300:]) == y[300:]).mean())
    assert 0.5 < expected < 1.0
    assert knn_accuracy(f[:300], y[:300], f[300:], y[300:], k=20) == expected
