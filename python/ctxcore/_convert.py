"""Input validation and conversion shared by the Python API.

Arrays cross into Rust as C-contiguous numpy arrays of the exact dtype. CPU torch tensors are
viewed as numpy without a copy; results go back as torch tensors when the input was one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .exceptions import DeviceError, DTypeError, ShapeError


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a ``torch.Tensor`` (without importing torch when it is not loaded)."""
    t = type(x)
    return t.__module__.startswith("torch") and hasattr(x, "data_ptr") and hasattr(x, "numpy")


def as_2d(x: Any, what: str, dtype: np.dtype, width: int | None, width_name: str = "dim") -> np.ndarray:
    """Return ``x`` as a C-contiguous 2-D numpy array of ``dtype``, or raise a typed error.

    Accepts numpy arrays, CPU torch tensors and nested sequences. Arrays and tensors of another
    dtype are rejected (never silently converted); non-contiguous ones are copied.
    """
    dtype = np.dtype(dtype)
    if is_torch(x):
        if x.device.type != "cpu":
            raise DeviceError(
                f"{what} is on {x.device}, but this operation runs on the CPU; pass {what}.cpu()"
            )
        tname = str(x.dtype).replace("torch.", "")
        if tname != dtype.name:
            raise DTypeError(
                f"{what}: expected dtype {dtype.name}, got torch.{tname}; "
                f"convert with .to(torch.{dtype.name})"
            )
        x = x.detach().contiguous().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise DTypeError(
                f"{what}: expected dtype {dtype.name}, got {x.dtype}; convert with .astype(np.{dtype.name})"
            )
    else:
        try:
            x = np.asarray(x, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise DTypeError(
                f"{what}: could not convert {type(x).__name__} to a {dtype.name} array: {e}"
            ) from e
    if x.ndim != 2:
        hint = " (for a single vector use x[None, :])" if x.ndim == 1 else ""
        wdesc = width if width is not None else width_name
        raise ShapeError(f"{what}: expected a 2-D array [n, {wdesc}], got shape {tuple(x.shape)}{hint}")
    if width is not None and x.shape[1] != width:
        raise ShapeError(f"{what}: expected shape [n, {width}] ({width_name}={width}), got {tuple(x.shape)}")
    return np.ascontiguousarray(x)


def like(result: np.ndarray, template: Any) -> Any:
    """Return ``result`` as a torch tensor if ``template`` is one (zero-copy), else unchanged."""
    if is_torch(template):
        import torch

        return torch.from_numpy(result)
    return result
