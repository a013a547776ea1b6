"""Datasets: the m2snet format (dataset.json + images/ + masks/; docs/data-format.md), one importer
per public layout, validation, near-duplicate clustering, the split file, the training dataset and
its cache, and the data version (a function of the data alone)."""
