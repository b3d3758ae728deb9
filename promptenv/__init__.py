"""PMLM promptenv package."""
