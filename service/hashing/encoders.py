"""Binary code encoders fitted on a collection's vectors: LSH, spectral hashing and ITQ.

Pure numpy, no database: `fit` returns a `CodeParams` whose arrays are stored with the code
set, and `encode` turns vectors into bits with nothing but those arrays, so a query is always
encoded exactly as the collection was.

All methods work on L2-normalised vectors, because the service ranks by cosine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

METHODS = ("lsh", "spectral", "itq")
MIN_BITS, MAX_BITS = 8, 1024


@dataclass
class CodeParams:
    """Everything needed to encode a vector: the method and its fitted arrays."""

    method: str
    bits: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The arrays as one `.npz` blob (stored in `code_sets.params`)."""
        buf = io.BytesIO()
        # float64 arrays: a query must be encoded bit-for-bit as the collection was.
        np.savez(buf, **self.arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, method: str, bits: int, blob: bytes) -> CodeParams:
        """Read back what `to_bytes` wrote."""
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            return cls(method, bits, {k: data[k] for k in data.files})


def _unit(vectors: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _pca(x: np.ndarray, n: int) -> np.ndarray:
    """The top-n principal directions (columns) of centred data, signs fixed for determinism."""
    # Eigenvectors of the d x d covariance: far cheaper than an SVD of the n x d data.
    values, vectors = np.linalg.eigh(x.T @ x)
    pc = vectors[:, np.argsort(values)[::-1][:n]]
    # SVD returns each direction up to its sign; pin it so that refits give the same codes.
    signs = np.sign(pc[np.abs(pc).argmax(axis=0), np.arange(pc.shape[1])])
    return pc * np.where(signs == 0, 1.0, signs)


def fit_lsh(vectors: np.ndarray, bits: int, seed: int = 0) -> CodeParams:
    """Random-hyperplane LSH (Charikar 2002) through the collection's mean."""
    x = _unit(vectors)
    # CNN features are non-negative, so hyperplanes through the origin would put almost every
    # vector on the same side; centring on the mean makes each bit split the data.
    mean = x.mean(axis=0)
    planes = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
    return CodeParams("lsh", bits, {"mean": mean, "planes": planes})


def fit_spectral(vectors: np.ndarray, bits: int) -> CodeParams:
    """Spectral hashing (Weiss, Torralba & Fergus 2008): PCA, then the smallest 1-d eigenmodes."""
    x = _unit(vectors)
    mean = x.mean(axis=0)
    npca = min(bits, x.shape[1], max(1, len(x) - 1))
    pc = _pca(x - mean, npca)
    proj = (x - mean) @ pc
    # Eps keeps points on the box's edges strictly inside, as in the authors' code.
    mn, mx = proj.min(axis=0) - 1e-6, proj.max(axis=0) + 1e-6
    span = mx - mn
    # Along principal direction i, the k-th eigenfunction of the uniform box has eigenvalue
    # ~ (k*pi/span_i)^2; candidate modes per direction in proportion to its span.
    max_mode = np.ceil((bits + 1) * span / span.max()).astype(int)
    # Candidate modes as (direction, frequency index) pairs, not dense rows: at 1,024 bits a
    # dense table would take gigabytes. The constant mode (k = 0) is never a candidate.
    axes = np.concatenate([np.full(m - 1, i) for i, m in enumerate(max_mode)])
    ks = np.concatenate([np.arange(1, m) for m in max_mode])
    omega0 = np.pi / span
    eigen = (ks * omega0[axes]) ** 2
    # Stable order: ties between equal eigenvalues resolve by position, not by chance.
    order = np.argsort(eigen, kind="stable")[:bits]
    if len(order) < bits:
        raise ValueError(f"spectral hashing found only {len(order)} modes for {bits} bits")
    chosen = np.zeros((bits, npca))
    chosen[np.arange(bits), axes[order]] = ks[order] * omega0[axes[order]]
    return CodeParams("spectral", bits, {"mean": mean, "pc": pc, "mn": mn, "omegas": chosen})


def fit_itq(vectors: np.ndarray, bits: int, seed: int = 0, iterations: int = 50) -> CodeParams:
    """Iterative quantisation (Gong & Lazebnik 2011): PCA to `bits` dims, then a learnt rotation."""
    x = _unit(vectors)
    mean = x.mean(axis=0)
    if bits > min(x.shape[1], len(x) - 1):
        raise ValueError(f"ITQ needs bits <= min(dim, rows - 1) = {min(x.shape[1], len(x) - 1)}")
    pc = _pca(x - mean, bits)
    v = (x - mean) @ pc
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        # Orthogonal Procrustes: the rotation that best maps V onto the current codes.
        s, _, st = np.linalg.svd(v.T @ b)
        rotation = s @ st
    return CodeParams("itq", bits, {"mean": mean, "projection": pc @ rotation})


def fit(method: str, vectors: np.ndarray, bits: int, seed: int = 0) -> CodeParams:
    """Fit `method` on the collection's vectors."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}")
    if len(vectors) < 2:
        raise ValueError("fitting needs at least two vectors")
    if method == "lsh":
        return fit_lsh(vectors, bits, seed)
    if method == "spectral":
        return fit_spectral(vectors, bits)
    return fit_itq(vectors, bits, seed)


def encode(params: CodeParams, vectors: np.ndarray) -> np.ndarray:
    """Bits (a bool array, one row per vector) of vectors under fitted parameters."""
    a = params.arrays
    x = _unit(vectors) - a["mean"]
    if params.method == "lsh":
        return (x @ a["planes"]) > 0
    if params.method == "itq":
        return (x @ a["projection"]) >= 0
    proj = x @ a["pc"] - a["mn"]
    # Each chosen mode varies along one principal direction only (the eigenfunctions are
    # separable), so bit j is the sign of one sinusoid: vectorised, not a loop over bits.
    omegas = a["omegas"]
    axis = np.abs(omegas).argmax(axis=1)
    freq = omegas[np.arange(len(omegas)), axis]
    return np.sin(proj[:, axis] * freq + np.pi / 2) > 0


def to_bitstring(bits: np.ndarray) -> str:
    """One code as PostgreSQL's bit literal text ('0101…')."""
    return "".join("1" if b else "0" for b in bits)
