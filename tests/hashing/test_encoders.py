"""Encoders without a database: determinism, balance and the neighbourhoods they keep."""

from __future__ import annotations

import numpy as np
import pytest

from service.hashing.encoders import METHODS, CodeParams, encode, fit, to_bitstring


@pytest.fixture(scope="module")
def clusters() -> np.ndarray:
    """400 non-negative vectors in 8 tight clusters, like ReLU features."""
    rng = np.random.default_rng(7)
    centres = np.abs(rng.normal(size=(8, 64)))
    return np.abs(centres[np.arange(400) % 8] + 0.05 * rng.normal(size=(400, 64)))


@pytest.mark.parametrize("method", METHODS)
def test_codes_are_deterministic_and_survive_storage(clusters: np.ndarray, method: str) -> None:
    params = fit(method, clusters, 32, seed=3)
    again = fit(method, clusters, 32, seed=3)
    stored = CodeParams.from_bytes(method, 32, params.to_bytes())
    codes = encode(params, clusters)
    assert codes.shape == (400, 32)
    assert np.array_equal(codes, encode(again, clusters))
    assert np.array_equal(codes, encode(stored, clusters))
    # A query is encoded one vector at a time: the same bits as in the batch.
    assert np.array_equal(encode(stored, clusters[5]), codes[5:6])


@pytest.mark.parametrize("method", METHODS)
def test_same_cluster_is_closer_in_hamming(clusters: np.ndarray, method: str) -> None:
    codes = encode(fit(method, clusters, 32), clusters).astype(int)
    ham = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    same = (np.arange(400)[:, None] % 8) == (np.arange(400)[None, :] % 8)
    assert ham[same].mean() < 0.5 * ham[~same].mean()


def test_bitstring_and_validation(clusters: np.ndarray) -> None:
    assert to_bitstring(np.array([True, False, True])) == "101"
    with pytest.raises(ValueError):
        fit("pq", clusters, 32)
    with pytest.raises(ValueError):
        fit("lsh", clusters, 4096)
    with pytest.raises(ValueError):
        fit("itq", clusters, 128)  # more bits than the 64 dimensions
