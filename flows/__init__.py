"""PMLM flows package."""
