"""A `.safetensors` writer that streams one tensor at a time (no library writes that way).

`safetensors.torch.save_file` serialises the whole state dict into memory before writing, i.e.
one more copy of the model; a 7B export or a prune-export on a small host cannot afford it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsStreamWriter:
    """Write a `.safetensors` file one tensor at a time.

    `safetensors.torch.save_file` needs the whole state dict in memory at once; since the header
    (names, dtypes, shapes, offsets) only needs metadata, we write it first from a plan and then
    append tensors in plan order, so peak memory is one tensor. The file is written under a
    temporary name and renamed on success, so a failed conversion never leaves a truncated
    `model.safetensors` behind that would look valid.
    """

    def __init__(self, path: str | Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; big-endian hosts are not supported")
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._plan: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for key, shape, dtype in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._plan.append((key, tuple(shape), dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, shape, dtype, nbytes = self._plan[self._next]
        if key != want_key or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {want_key} {shape} {dtype}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._plan):
            self._tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._plan)} tensors were written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                    metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` without the in-memory copy (same file, tensor by tensor)."""
    plan = [(k, tuple(v.shape), v.dtype) for k, v in state_dict.items()]
    with SafetensorsStreamWriter(path, plan, metadata) as w:
        for k, v in state_dict.items():
            w.write(k, v)
    return Path(path)
