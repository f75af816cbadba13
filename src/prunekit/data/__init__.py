"""Data pruning: score training examples, select a subset under a keep budget, or sample dynamically."""
