"""Binary codes of the CNN vectors (LSH, spectral hashing, ITQ) and Hamming search."""
