"""Datasets in the VG benchmark layout: name parsing, indexing, the synthetic demo set."""
