"""A minimal reader and writer of the safetensors format, so that checkpoints need no extra package.

The format (https://github.com/huggingface/safetensors, "Format"):

    [ n : u64 little-endian ][ header : n bytes of UTF-8 JSON ][ data : the raw tensor bytes ]

    header = { name: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...,
               "__metadata__": {str: str} }                        (metadata optional)

Offsets count bytes from the start of the data section; the tensors fill it in order, without gaps or
overlap, each stored row-major and little-endian. We pad the header with spaces to a multiple of 8 bytes and
lay the tensors out widest element first, as the reference implementation does, so every tensor starts
aligned to its element size.

Files written here load with the `safetensors` package and vice versa (tests/test_checkpoint.py checks both
directions). Reading fills each tensor straight from the file, without an intermediate copy of the data.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Mapping, Optional

import torch

# The format's dtype names. Float8 and wide unsigned integers exist only in newer torch builds.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
NAME_TO_DTYPE: Dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}
DTYPE_TO_NAME: Dict[torch.dtype, str] = {dtype: code for code, dtype in NAME_TO_DTYPE.items()}

# Same cap as the reference implementation: a larger header means a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("zigspark's safetensors I/O stores raw bytes and supports little-endian hosts only")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, as a buffer that file.write takes without copying."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def save_file(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `tensors` ({name: tensor}, any shapes, dtypes in NAME_TO_DTYPE) to `path` in safetensors format.

    `metadata` is an optional {str: str} stored under "__metadata__". Tensors may live on any device (they
    are copied to the CPU). The file is flushed and fsynced before this returns.
    """
    _require_little_endian()
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str (safetensors stores metadata as strings); "
                        "convert the values with str() or json.dumps()")
    entries = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is not allowed: names must be strings other than '__metadata__'")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in DTYPE_TO_NAME:
            raise TypeError(f"tensors[{name!r}] has dtype {tensor.dtype}, which safetensors cannot store; "
                            f"use one of {sorted(str(d) for d in DTYPE_TO_NAME)}")
        entries.append((name, tensor))
    # Widest elements first keeps every tensor aligned to its own element size.
    entries.sort(key=lambda e: (-e[1].element_size(), e[0]))

    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_TO_NAME[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, tensor in entries:
            if tensor.numel():
                f.write(_raw_bytes(tensor))
        f.flush()
        os.fsync(f.fileno())


def read_header(f, path="<file>") -> tuple:
    """(header dict without "__metadata__", metadata dict, byte offset of the data section) of an open file."""
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a safetensors file (header length {n} bytes is implausible)")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"{path} is truncated: its header needs {n} bytes, the file has {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def _begin_offset(item) -> int:
    try:
        return int(item[1]["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return 0


def load_file(path, device="cpu") -> Dict[str, torch.Tensor]:
    """Read a safetensors file into {name: tensor} on `device` (the tensors own their memory)."""
    return load_file_with_metadata(path, device)[0]


def load_file_with_metadata(path, device="cpu") -> tuple:
    """({name: tensor}, metadata {str: str}) of a safetensors file; tensors are moved to `device`."""
    _require_little_endian()
    with open(path, "rb") as f:
        header, metadata, data_start = read_header(f, path)
        data_len = os.fstat(f.fileno()).st_size - data_start
        tensors: Dict[str, torch.Tensor] = {}
        # Reading in offset order makes the file access sequential.
        for name, info in sorted(header.items(), key=_begin_offset):
            if not isinstance(info, dict):
                raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
            if info.get("dtype") not in NAME_TO_DTYPE:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which this reader "
                                 f"does not know (known: {', '.join(NAME_TO_DTYPE)})")
            try:
                dtype = NAME_TO_DTYPE[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
            tensor = torch.empty(shape, dtype=dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if end - begin != nbytes or begin < 0 or end > data_len:
                raise ValueError(f"{path}: tensor {name!r} ({info['dtype']}, shape {shape}) claims bytes "
                                 f"[{begin}, {end}) of a {data_len}-byte data section; the file is corrupt")
            if nbytes:
                f.seek(data_start + begin)
                buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(buffer) != nbytes:
                    raise ValueError(f"{path}: tensor {name!r} is truncated")
            tensors[name] = tensor if str(device) == "cpu" else tensor.to(device)
    return tensors, dict(metadata)
