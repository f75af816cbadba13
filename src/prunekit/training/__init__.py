"""Training-time pruning: masks that hold through training, allocation, pruning at initialization, schedules."""
