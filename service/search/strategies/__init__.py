"""One module per way of searching, each a `Strategy` (service/search/types.py).

The registry that names them is service/search/registry.py, not this package's init: the
planned vector search (service/search/vectors.py) imports exact and hnsw and is itself used
by crops, text and hybrid, so an init that imported every strategy would import in a circle.
"""
