"""Exact float64 NumPy references: brute-force SDI from factor streams, and a looped transformer
with a hand-written backward pass that emits the factor stream of every use."""
from .brute_force import (
    countsketch_loop,
    exact_sdi,
    per_step_gradients,
    tensorsketch_by_definition,
    tensorsketch_by_fft,
    use_gradient,
)
