"""`rlmt-jax plan`: memory and time per device and phase from the real shapes, shardings and published chip
figures, before a run is launched."""
