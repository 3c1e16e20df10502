"""Fitness tasks: what a candidate is scored on (being split into one module per concern)."""
from search.fitness.core import *  # noqa: F401,F403
from search.fitness.core import greedy_decode, length_batches, subsample_indices  # noqa: F401
