"""Datasets, loaders and answer vocabularies."""
