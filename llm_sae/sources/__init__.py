"""Where training batches come from: stores, pairs of stores, synthetic data."""
