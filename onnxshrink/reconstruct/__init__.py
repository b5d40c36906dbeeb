"""Block-wise reconstruction on PyTorch (the ``reconstruct`` extra): blocks, ops, training."""


class Unsupported(Exception):
    """An op (or an attribute form of it) the torch op table does not compute: the block that
    holds it is left as it is, with this reason."""
