"""Evaluations: judge model, FID/KID, alignment, contamination checks (see ARCHITECTURE.md)."""
