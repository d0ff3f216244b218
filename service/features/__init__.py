"""Hand-crafted image features: the pre-deep-learning baselines (colour histogram, pHash)."""
