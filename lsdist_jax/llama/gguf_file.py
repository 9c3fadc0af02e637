"""Reads a GGUF file's header: its key/value fields (arrays of strings, such as the vocabulary,
by length only) and where each tensor's bytes lie. `read` proves the file whole (the magic
bytes, a header that ends inside the file, every tensor's data inside the file) and names the
file and the cause when it is not; `weights.load_gguf` uses its header instead of the `gguf`
package's reader (that one decodes every field, the whole vocabulary
included, element by element: ~10 s of a 2-core CPU for SmolLM2, against well under one here).

Pure Python (struct over a memory map); GGUF versions 2 and 3, little-endian (other files are
left to the reader, whose errors `weights.load_gguf` wraps).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

from lsdist_jax.errors import BadFileError, MissingFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Value types of the key/value section: sizes of the fixed-size ones; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
SMALL_ARRAY = 64  # arrays of numbers up to this length are decoded; longer ones by length only


class Skipped:
  """An array field read by its length only (the vocabulary, its scores and merges)."""

  def __init__(self, count: int):
    self.count = count

  def __len__(self) -> int:
    return self.count

  def __repr__(self) -> str:
    return f"Skipped({self.count})"


class _Corrupt(Exception):
  """Raised inside the walk; `check` turns it into a BadFileError naming the file."""


class _Cursor:
  def __init__(self, buf, size: int):
    self.buf, self.size, self.pos = buf, size, 0

  def take(self, fmt: str):
    n = struct.calcsize(fmt)
    if self.pos + n > self.size:
      raise _Corrupt(f"its header runs past the end of the file ({self.size:,} bytes)")
    value = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += n
    return value[0] if len(value) == 1 else value

  def skip(self, n: int) -> None:
    if n < 0 or self.pos + n > self.size:
      raise _Corrupt(f"its header runs past the end of the file ({self.size:,} bytes)")
    self.pos += n

  def string(self, decode: bool = False, errors: str = "strict") -> str | None:
    """Reads (or with decode=False only skips) one length-prefixed string: a name must be UTF-8
    (errors="strict"); a value may replace what is not (errors="replace")."""
    n = self.take("<Q")
    start = self.pos
    self.skip(n)
    if not decode:
      return None
    try:
      return bytes(self.buf[start:self.pos]).decode("utf-8", errors=errors)
    except UnicodeDecodeError:
      raise _Corrupt(f"a name at byte {start:,} is not UTF-8 text") from None

  def value(self, vtype: int, full: bool = False):
    """Reads one value of type `vtype`: a number, a string, a list of up to SMALL_ARRAY numbers,
    or a `Skipped` array (every other array, walked over without being decoded); with `full`,
    an array of numbers or strings is decoded whatever its length."""
    if vtype in _FIXED:
      return self.take(_FORMATS[vtype])
    if vtype == _STRING:
      return self.string(decode=True, errors="replace")
    if vtype == _ARRAY:
      etype, count = self.take("<IQ")
      if etype in _FIXED:
        if count <= SMALL_ARRAY or full:
          fmt = "<" + _FORMATS[etype][1] * count
          if self.pos + struct.calcsize(fmt) > self.size:
            raise _Corrupt(f"an array of {count:,} numbers runs past the end of the file")
          values = list(struct.unpack_from(fmt, self.buf, self.pos))
          self.pos += struct.calcsize(fmt)
          return values
        self.skip(count * _FIXED[etype])
      elif etype in (_STRING, _ARRAY):
        if count * 8 > self.size - self.pos:  # every element takes at least 8 bytes
          raise _Corrupt(f"an array of {count:,} elements runs past the end of the file "
                         f"({self.size:,} bytes)")
        if etype == _STRING and full:
          return [self.string(decode=True, errors="replace") for _ in range(count)]
        for _ in range(count):  # strings skipped, not decoded (the vocabulary)
          self.string() if etype == _STRING else self.value(etype)
      else:
        raise _Corrupt(f"unknown value type {etype} at byte {self.pos:,}")
      return Skipped(count)
    raise _Corrupt(f"unknown value type {vtype} at byte {self.pos:,}")


def _tensor_bytes(name: str, dims: tuple[int, ...], ggml_type: int) -> int:
  import gguf

  try:
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
  except (ValueError, KeyError):
    raise _Corrupt(f"tensor {name!r} has unknown type {ggml_type}") from None
  elements = 1
  for d in dims:
    elements *= d
  return elements * type_size // block


@dataclasses.dataclass
class Header:
  """fields: key -> value (`Cursor.value`); tensors: name -> (dims, ggml type, absolute byte
  offset, bytes), dims in GGUF order (the first is the fastest-varying)."""
  fields: dict
  tensors: dict


def _walk(buf, size: int, full_arrays=()) -> Header | None:
  cur = _Cursor(buf, size)
  cur.skip(4)  # magic, checked by the caller
  version = cur.take("<I")
  if version & 0xFFFF == 0:
    return None  # a big-endian file: left to the gguf package's reader
  if version not in VERSIONS:
    raise _Corrupt(f"GGUF version {version}; versions {VERSIONS} are read")
  tensor_count, kv_count = cur.take("<QQ")
  fields = {}
  for _ in range(kv_count):
    key = cur.string(decode=True)
    try:
      fields[key] = cur.value(cur.take("<I"), full=key in full_arrays)
    except _Corrupt as e:
      raise _Corrupt(f"{e}, in the value of {key!r}") from None
  alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
  if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
    raise _Corrupt(f"general.alignment is {alignment!r}, not a power of two")
  if tensor_count * 24 > size - cur.pos:  # name length, n_dims, type, offset: 24 bytes or more
    raise _Corrupt(f"it lists {tensor_count:,} tensors, more than the file "
                   f"({size:,} bytes) can hold")
  listed = []
  for _ in range(tensor_count):
    name = cur.string(decode=True)
    n_dims = cur.take("<I")
    if n_dims > MAX_DIMS:
      raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = tuple(cur.take("<Q") for _ in range(n_dims))
    ggml_type, offset = cur.take("<IQ")
    listed.append((name, dims, ggml_type, offset, _tensor_bytes(name, dims, ggml_type)))
  data_start = -(-cur.pos // alignment) * alignment
  if listed:
    end, name = max((data_start + t[3] + t[4], t[0]) for t in listed)
    if end > size:
      raise _Corrupt(f"its tensor data ends at byte {end:,} (tensor {name!r}) but the file has "
                     f"{size:,} bytes")
  return Header(fields, {name: (dims, ggml_type, data_start + offset, nbytes)
                         for name, dims, ggml_type, offset, nbytes in listed})


def read(path: str, full_arrays=()) -> Header | None:
  """The header of the GGUF file at `path` (None for a big-endian file, left to the gguf
  package), the arrays named in `full_arrays` (e.g. the vocabulary) decoded whole;
  BadFileError naming the file unless it holds a header and all its tensor data."""
  if not os.path.isfile(path):
    raise MissingFileError(f"GGUF file not found: {path}")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(len(MAGIC))
    if head != MAGIC:
      if head and MAGIC.startswith(head):
        raise BadFileError(f"{path} is a truncated GGUF file (only {size} bytes)")
      found = "it is empty" if not head else f"it starts with {head!r}, not {MAGIC!r}"
      raise BadFileError(f"{path} is not a GGUF file ({found})")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      try:
        return _walk(buf, size, tuple(full_arrays))
      except _Corrupt as e:
        raise BadFileError(f"{path} is a truncated or corrupt GGUF file: {e}") from None


def tensor_bytes(path: str):
  """A read-only uint8 view of the whole file (a memory map: pages are read as they are used)."""
  import numpy as np

  with open(path, "rb") as f:
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return np.frombuffer(buf, dtype=np.uint8)


# Block layouts of the quantized types `dequantize` reads: (values per block, bytes per block)
_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}


def dequantize(data, type_name: str):
  """float32 values of a little-endian tensor's stored bytes (`data`: uint8, any shape; the
  result is flat, in storage order), for F32, F16, BF16, Q8_0, Q4_0 and Q4_1: a few whole-
  tensor numpy operations per tensor. (The gguf package's dequantization works 16 rows at a
  time: for SmolLM2 tens of thousands of numpy calls, each giving up the GIL and waiting to
  take it back from the compile threads that trace beside the load.)
  Q8_0 block: an f16 scale d, then 32 int8 q: d * q. Q4_0: d, then 16 bytes whose low nibbles
  are values 0-15 and high nibbles 16-31: d * (q - 8). Q4_1: d, an f16 minimum m, then the
  nibbles as in Q4_0: d * q + m."""
  import numpy as np

  raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
  if type_name == "F32":
    return raw.view("<f4").astype(np.float32)
  if type_name == "F16":
    return raw.view("<f2").astype(np.float32)
  if type_name == "BF16":
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
  if type_name not in _BLOCKS:
    raise ValueError(f"cannot dequantize GGUF type {type_name}")
  values, size = _BLOCKS[type_name]
  blocks = raw.reshape(-1, size)
  d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # [n, 1]
  if type_name == "Q8_0":
    return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
  packed = blocks[:, size - values // 2:]
  q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)
  if type_name == "Q4_0":
    return (d * (q.astype(np.float32) - 8.0)).reshape(-1)
  m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
  return (d * q.astype(np.float32) + m).reshape(-1)
