"""Benchmarks of the ztp daemons against the local sandbox, one module per benchmark."""
