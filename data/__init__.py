"""Datasets: sources -> prepared uint8 arrays + manifest (DALI), loaders for training and evaluation, and
image grids as PNG. Imports `common` only."""
