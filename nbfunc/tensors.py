"""Tensor-valued pydantic fields: validation from numbers or lists, JSON round trip.

A field annotated with `TensorLike` accepts a torch tensor, a numpy array, a number or a nested
list, and stores a torch tensor (float64 unless a tensor of another floating dtype is given).
In JSON it is written as ``{"dtype": "float64", "shape": [...], "data": [...]}`` so that
``Params.model_validate_json(p.model_dump_json())`` gives back the same tensors.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bool": torch.bool,
           "int64": torch.int64, "uint8": torch.uint8}


def to_tensor(value: Any) -> torch.Tensor:
    """Convert a number, list, array or tensor into a torch tensor (float64 by default).

    Raises:
        ValueError: when the value cannot be read as numbers.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) and {"dtype", "shape", "data"} <= value.keys():
        dtype = _DTYPES.get(value["dtype"])
        if dtype is None:
            raise ValueError(f"unknown tensor dtype {value['dtype']!r}; expected one of {sorted(_DTYPES)}")
        return torch.tensor(value["data"], dtype=dtype).reshape(value["shape"])
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected a number or an array of numbers, got {value!r}") from err
    return torch.from_numpy(array.copy())


def tensor_to_json(t: torch.Tensor) -> dict:
    """Serialize a tensor as dtype, shape and flat data (exact for float64 via repr floats)."""
    t = t.detach().cpu()
    name = str(t.dtype).replace("torch.", "")
    return {"dtype": name, "shape": list(t.shape), "data": t.reshape(-1).tolist()}


TensorLike = Annotated[
    torch.Tensor,
    PlainValidator(to_tensor),
    PlainSerializer(tensor_to_json, when_used="json"),
    WithJsonSchema({"type": "object", "properties": {"dtype": {"type": "string"},
                                                     "shape": {"type": "array"},
                                                     "data": {"type": "array"}}}),
]
