"""Recipes: per-tensor types for a rung, and the file they make, assembled from per-type quantizations."""
