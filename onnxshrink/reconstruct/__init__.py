"""Block-wise reconstruction on PyTorch (the ``reconstruct`` extra): blocks, ops, training."""
