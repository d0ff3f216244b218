"""Retrieval quality: mAP, precision and recall at k."""
