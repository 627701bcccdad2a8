"""Hydra plugin package: stad's sweeper (``hydra/sweeper=stad``), see ``stad.sweep``."""
