"""The k-nearest-neighbour graph of each collection, its MST clusters and related images."""
