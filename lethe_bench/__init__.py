"""Benchmarks of the service (acknowledgement rate, coalescing, steady-state cost); not shipped in the image."""
