"""Images: upload, storage, decoding, listing and deletion."""
