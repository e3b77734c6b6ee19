"""Evaluation: bits/dim, sample quality, task metrics and image output."""
