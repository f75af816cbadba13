"""Weight pruning: scorers, reconstruction kernels and the sequential engine."""
