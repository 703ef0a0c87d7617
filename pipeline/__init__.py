"""Visual geo-localization with re-ranking: a staged, Snakemake-driven pipeline."""

__version__ = "0.1.0"
