"""Data: the synthetic Localized-Narratives world, vocabularies, and input pipelines."""
