"""Pure functions over models and weights: matching, connectivity, symmetry and landscape metrics, plots."""
