"""Plain-PyTorch specifications of every op and the faithful reference algorithm."""
