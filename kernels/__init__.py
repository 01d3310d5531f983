"""GPU kernels (paged decode attention) and their pure-JAX references."""
