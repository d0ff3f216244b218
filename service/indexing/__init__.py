"""Indexing: everything that follows an embedding, for one image or a batch, and reindexing."""
