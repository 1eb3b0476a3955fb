"""Analyses of fine-tuned weights (spectral metrics) that the loop and the tables can report."""
