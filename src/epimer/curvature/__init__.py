"""Curvature: the Fisher diagonal of each task and its projection onto the tagged basis."""
