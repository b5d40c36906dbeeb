"""``--data random:N``: seeded random samples for every model input.

Floats are standard normal, integers and booleans 0 or 1. A dynamic batch axis becomes 1; any
other dynamic dimension cannot be guessed and is refused with its name, as is more than 2 GiB
of samples. The report warns that random data says little.
"""

from __future__ import annotations

import numpy as np

from onnxshrink.errors import DataError

__all__ = ["random_arrays"]

_SEED = 20240229
_RANDOM_BYTES = 1 << 31  # at most 2 GiB of samples


def random_arrays(specs, n: int) -> dict[str, np.ndarray]:
    """``n`` seeded samples for every input of ``specs`` (:class:`onnxshrink.data.InputSpec`)."""
    if n <= 0:
        raise DataError("random:N needs N >= 1")
    rng = np.random.default_rng(_SEED)
    arrays = {}
    for s in specs:
        dims = list(s.dims)
        for axis, d in enumerate(dims):
            if d is None:
                if axis == 0:
                    dims[0] = 1
                else:
                    raise DataError(
                        f"input '{s.name}' has a dynamic dimension "
                        f"'{s.dim_names[axis] or '?'}' (axis {axis}); random data cannot guess "
                        "its size: give --data with real samples"
                    )
        if (
            any(d < 1 for d in dims[1:])
            or np.prod(dims[1:], dtype=np.float64) * n * 4 > _RANDOM_BYTES
        ):
            raise DataError(
                f"input '{s.name}' has shape {list(s.dims)}: random data cannot fill "
                f"{n} samples of it (at most {_RANDOM_BYTES >> 30} GiB); give --data"
            )
        shape = (n, *dims[1:]) if dims else (n,)
        if np.issubdtype(s.dtype, np.floating):
            arr = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype, copy=False)
        elif s.dtype == np.bool_:
            arr = rng.integers(0, 2, shape).astype(np.bool_)
        elif np.issubdtype(s.dtype, np.integer):
            arr = rng.integers(0, 2, shape).astype(s.dtype)
        else:
            raise DataError(f"input '{s.name}' has dtype {s.dtype}: random data cannot fill it")
        arrays[s.name] = arr
    if not specs or not specs[0].dims:
        raise DataError("random data needs inputs with a batch axis")
    return arrays
