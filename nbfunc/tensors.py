"""Tensor-valued pydantic fields: validation from numbers or lists, JSON round trip.

A field annotated with `TensorLike` accepts a torch tensor, a numpy array, a number or a nested
list, and stores a torch tensor (float64 unless a tensor of another floating dtype is given).
In JSON it is written as ``{"dtype": "float64", "shape": [...], "data": [...]}`` so that
``Params.model_validate_json(p.model_dump_json())`` gives back the same tensors.

Validation refuses what no render can use, naming the field: floating tensors other than
float32 and float64, complex tensors, tensors without data (device ``meta``), NaN or infinite
entries, and JSON tensors whose ``shape`` does not match their ``data``.

A field annotated with `StaticArray` holds a static table of numbers (mosaic draws, source
fractions): a float64 CPU tensor that is not a leaf, written to JSON the same way. Each such
field's own validator checks its entries.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Callable

import numpy as np
import torch
from pydantic import PlainSerializer, PlainValidator, ValidationInfo, WithJsonSchema

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bool": torch.bool,
           "int64": torch.int64, "uint8": torch.uint8}
FLOAT_DTYPES = (torch.float32, torch.float64)
"""The floating dtypes a render runs in."""


def _from_json(value: dict, name: str) -> torch.Tensor:
    """The tensor of a ``{"dtype", "shape", "data"}`` dict (`tensor_to_json`'s layout); other
    keys are refused rather than ignored (``"device": "cuda"`` would silently stay on cpu)."""
    extra = sorted(map(str, set(value) - {"dtype", "shape", "data"}))
    if extra:
        raise ValueError(f"{name}: unknown JSON tensor keys {[k[:30] for k in extra[:3]]}; a "
                         "tensor holds only \"dtype\", \"shape\" and \"data\" (move a tree with "
                         "Params.to(device=...))")
    dtype = _DTYPES.get(value["dtype"])
    if dtype is None:
        raise ValueError(f"{name}: unknown tensor dtype {value['dtype']!r}; expected one of "
                         f"{sorted(_DTYPES)}")
    shape = value["shape"]
    if not (isinstance(shape, (list, tuple))
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"{name}: tensor shape {shape!r} is not a list of sizes; give \"shape\" "
                         "as a list of non-negative integers, e.g. [3]")
    try:
        flat = torch.tensor(value["data"], dtype=dtype).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: tensor data is not a list of {value['dtype']} numbers "
                         f"({' '.join(str(err).split())[:80]}); give \"data\" as a flat list of "
                         "numbers") from None
    if flat.numel() != math.prod(shape):
        raise ValueError(f"{name}: tensor shape {list(shape)} holds {math.prod(shape)} values but "
                         f"\"data\" has {flat.numel()}; make the product of \"shape\" equal the "
                         "number of values in \"data\"")
    return flat.reshape(shape)


def describe(t: torch.Tensor) -> str:
    """A short text of a tensor's value: its numbers when at most 9, else its shape."""
    t = t.detach()
    if t.numel() <= 9:
        return str(t.cpu().tolist())
    return f"a tensor of shape {tuple(t.shape)}"


def check_tensor(t: torch.Tensor, name: str) -> None:
    """Refuse a tensor no render can use (see the module docstring).

    Raises:
        ValueError: one line naming ``name``, the value and the fix.
    """
    if t.device.type == "meta":
        raise ValueError(f"{name} holds no data (device meta); give a tensor on cpu or cuda")
    if t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); give real numbers (float32 or float64)")
    if not t.is_floating_point():
        return
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} is {str(t.dtype).removeprefix('torch.')}, but nbfunc renders "
                         "in float32 or float64; convert it with .to(torch.float32) or "
                         ".to(torch.float64)")
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        if t.dim() == 0:
            raise ValueError(f"{name} = {t.item()} is not finite; give a finite number")
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries of {t.numel()} (first: "
                         f"{t.detach()[first].item()} at index {first}); replace them with "
                         "finite numbers")


def to_tensor(value: Any, name: str = "value") -> torch.Tensor:
    """Convert a number, list, array, tensor or JSON tensor into a torch tensor (float64 by
    default) and refuse one no render can use (`check_tensor`); ``name`` is the field's.

    Raises:
        ValueError: when the value cannot be read as numbers, or `check_tensor` refuses it.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, dict) and {"dtype", "shape", "data"} <= value.keys():
        tensor = _from_json(value, name)
    else:
        try:
            tensor = torch.from_numpy(np.asarray(value, dtype=np.float64).copy())
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected a number or an array of numbers, got "
                             f"{str(value)[:80]}") from err
    check_tensor(tensor, name)
    return tensor


def _validate(value: Any, info: ValidationInfo) -> torch.Tensor:
    """`to_tensor` as a pydantic validator, naming the field being validated."""
    return to_tensor(value, info.field_name or "value")


def tensor_to_json(t: torch.Tensor) -> dict:
    """Serialize a tensor as dtype, shape and flat data (exact for float64 via repr floats)."""
    t = t.detach().cpu()
    name = str(t.dtype).replace("torch.", "")
    return {"dtype": name, "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def _json_tensor_field(validator: Callable) -> Any:
    """A tensor field type validated by ``validator`` and written to JSON by `tensor_to_json`."""
    return Annotated[
        torch.Tensor,
        PlainValidator(validator),
        PlainSerializer(tensor_to_json, when_used="json"),
        WithJsonSchema({"type": "object", "properties": {"dtype": {"type": "string"},
                                                         "shape": {"type": "array"},
                                                         "data": {"type": "array"}}}),
    ]


TensorLike = _json_tensor_field(_validate)


def to_static_array(value: Any, name: str = "value") -> torch.Tensor:
    """A static table of numbers as a float64 CPU tensor, from a tensor, array, (nested)
    list or tuple, or JSON tensor; ``name`` is the field's. No copy is made of a float64 CPU
    tensor or array.

    Raises:
        ValueError: when the value cannot be read as real numbers.
    """
    if isinstance(value, dict) and {"dtype", "shape", "data"} <= value.keys():
        value = _from_json(value, name)
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.is_complex():
            raise ValueError(f"{name} must hold real numbers on cpu or cuda, got a "
                             f"{str(value.dtype).removeprefix('torch.')} tensor on {value.device}")
        return value.detach().to(dtype=torch.float64, device="cpu")
    try:
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected an array of numbers, got {str(value)[:80]}") from err
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _validate_static(value: Any, info: ValidationInfo) -> torch.Tensor:
    """`to_static_array` as a pydantic validator, naming the field being validated."""
    return to_static_array(value, info.field_name or "value")


StaticArray = _json_tensor_field(_validate_static)
"""A static float64 table of a `nbfunc.params` node (not a leaf): validated by `to_static_array`."""
