"""Pure-PyTorch implementations: the CPU default and the numerics oracle of every kernel."""
