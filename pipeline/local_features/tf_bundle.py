"""TensorFlow tensor bundles (checkpoints, SavedModel ``variables/``) read and written without TensorFlow.

A bundle with prefix ``P`` is two files (TensorFlow ``core/util/tensor_bundle``):

- ``P.index``: a LevelDB-format table (``core/lib/io/table``) mapping each key to a
  serialized protobuf: the empty key ``""`` to a ``BundleHeaderProto`` (number of shards,
  endianness, version), every other key (a variable's checkpoint key) to a
  ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked CRC32C of the bytes).
  The table is data blocks of prefix-compressed entries (restart points every 16 entries),
  an empty meta-index block, an index block (one entry per data block, restart interval 1)
  and a 48-byte footer (two block handles padded to 40 bytes, magic ``0xdb4775248b80fb57``);
  each block is followed by a compression byte (0: none; bundles are never compressed)
  and the masked CRC32C of the block plus that byte;
- ``P.data-00000-of-00001`` (one file per shard): the raw little-endian tensor bytes at
  each entry's offset. A string tensor (e.g. ``_CHECKPOINTABLE_OBJECT_GRAPH``, a
  serialized ``TrackableObjectGraph``) is stored as varint64 lengths, the masked CRC32C
  of those lengths, then the bytes.

:class:`TensorBundle` reads such a bundle (every CRC checked), :func:`write_bundle` writes
one that TensorFlow reads, byte-for-byte what TensorFlow's ``BundleWriter`` writes for the
same tensors in the same order. :func:`parse_object_graph` / :func:`encode_object_graph`
handle the ``TrackableObjectGraph`` that TF2 object-based checkpoints and SavedModels
store, which maps object paths (``_model/backbone/conv1/kernel``) to checkpoint keys
(``_model/variables/0/.ATTRIBUTES/VARIABLE_VALUE`` in a Keras SavedModel).

Only numpy is needed (CRC32C in numpy; ``google_crc32c``, when installed, computes the
same values faster). ``python -m pipeline.local_features.tf_bundle PATH`` lists a bundle.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass

import numpy as np

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 * BlockHandle::kMaxEncodedLength (20) + 8-byte magic
BLOCK_SIZE = 262144  # table::Options::block_size
RESTART_INTERVAL = 16  # table::Options::block_restart_interval (index block: 1)
BUNDLE_VERSION = 1  # kTensorBundleVersion (producer); min_consumer 0

#: TensorFlow ``DataType`` enum -> numpy dtype (little-endian); 7 is DT_STRING
DTYPES = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"), 5: np.dtype("<i2"),
    6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"), 14: np.dtype("<u2"), 17: np.dtype("<u2"),
    19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
DT_STRING, DT_BFLOAT16 = 7, 14
DTYPE_NAMES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
               9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32", 23: "uint64"}
NUMPY_TO_DTYPE = {np.dtype(v).str: k for k, v in DTYPES.items() if k not in (DT_BFLOAT16,)}


class BundleError(ValueError):
    """A malformed or unsupported bundle; the message names the file."""


# --------------------------------------------------------------------------- CRC32C
def _crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table[i] = c
    return table


_TABLE = _crc_table()
_TABLE_LIST = [int(x) for x in _TABLE]
_ZERO_OPS: dict[int, list[int]] = {}  # 2**k -> operator "feed 2**k zero bytes" as 32 columns


def _apply(op: list[int], v: int) -> int:
    out, i = 0, 0
    while v:
        if v & 1:
            out ^= op[i]
        v >>= 1
        i += 1
    return out


def _zeros_op(n: int) -> list[int]:
    """The GF(2)-linear map of the raw CRC register over ``n`` zero bytes (32 columns)."""
    result = [1 << i for i in range(32)]
    k = 0
    while n:
        if n & 1:
            op = _pow2_op(k)
            result = [_apply(op, c) for c in result]
        n >>= 1
        k += 1
    return result


def _pow2_op(k: int) -> list[int]:
    if k not in _ZERO_OPS:
        if k == 0:
            _ZERO_OPS[0] = [_TABLE_LIST[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
        else:
            half = _pow2_op(k - 1)
            _ZERO_OPS[k] = [_apply(half, c) for c in half]
    return _ZERO_OPS[k]


def _apply_many(op: list[int], v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for i, col in enumerate(op):
        out ^= ((v >> np.uint32(i)) & np.uint32(1)) * np.uint32(col)
    return out


def _raw_crc(data: np.ndarray) -> int:
    """CRC32C register after ``data`` (uint8) from a zero register, no final inversion.

    Long inputs are cut into equal chunks processed side by side with numpy, then
    combined pairwise (the register is linear: ``raw(A + B) = Z_|B|(raw(A)) ^ raw(B)``).
    Leading zero bytes leave a zero register unchanged, so the input is left-padded to
    a power-of-two number of chunks."""
    n = len(data)
    if n < 4096:
        crc = 0
        for b in data.tobytes():
            crc = _TABLE_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc
    chunk = 512
    m = 1 << (-(-n // chunk) - 1).bit_length()
    padded = np.zeros(m * chunk, dtype=np.uint8)
    padded[m * chunk - n:] = data
    cols = np.ascontiguousarray(padded.reshape(m, chunk).T)
    crc = np.zeros(m, dtype=np.uint32)
    for j in range(chunk):
        crc = _TABLE[(crc ^ cols[j]) & 0xFF] ^ (crc >> np.uint32(8))
    k = chunk.bit_length() - 1
    while len(crc) > 1:
        crc = _apply_many(_pow2_op(k), crc[0::2]) ^ crc[1::2]
        k += 1
    return int(crc[0])


def crc32c_numpy(data, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, extending ``crc`` (TensorFlow's ``crc32c::Extend``)."""
    arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    init = crc ^ 0xFFFFFFFF
    return (_apply(_zeros_op(len(arr)), init) ^ _raw_crc(arr)) ^ 0xFFFFFFFF


try:  # a C implementation, when installed (not required: the numpy one gives the same values)
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    _google_crc32c = None


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of ``data`` extending ``crc``: ``google_crc32c`` if installed, else :func:`crc32c_numpy`."""
    if _google_crc32c is None or len(data) < 4096:
        return crc32c_numpy(data, crc)
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return _google_crc32c.extend(crc, raw)


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- varints / protobuf
def read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("varint too long")


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def proto_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a serialized protobuf message (value: int
    for varint/fixed, bytes for length-delimited)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = read_varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            val, pos = bytes(buf[pos:pos + n]), pos + n
        elif wire == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        out.append((num, wire, val))
    if pos != len(buf):
        raise BundleError("truncated protobuf message")
    return out


def _pb_varint(num: int, val: int) -> bytes:
    return varint(num << 3) + varint(val)


def _pb_bytes(num: int, val: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(val)) + val


# --------------------------------------------------------------------------- bundle protos
@dataclass
class BundleEntry:
    """One ``BundleEntryProto``."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked, as stored
    sliced: bool = False

    @classmethod
    def parse(cls, buf: bytes) -> BundleEntry:
        e = cls(dtype=0, shape=())
        for num, _, val in proto_fields(buf):
            if num == 1:
                e.dtype = val
            elif num == 2:
                dims = []
                for dnum, _, dval in proto_fields(val):
                    if dnum == 2:
                        dims.append(next((v for n, _, v in proto_fields(dval) if n == 1), 0))
                    elif dnum == 3 and dval:
                        raise BundleError("tensor of unknown rank")
                e.shape = tuple(int(d) - (1 << 64) if d >= 1 << 63 else int(d) for d in dims)
            elif num == 3:
                e.shard_id = val
            elif num == 4:
                e.offset = val
            elif num == 5:
                e.size = val
            elif num == 6:
                e.crc32c = val
            elif num == 7:
                e.sliced = True
        return e

    def serialize(self) -> bytes:
        out = _pb_varint(1, self.dtype) if self.dtype else b""
        out += _pb_bytes(2, b"".join(_pb_bytes(2, _pb_varint(1, d) if d else b"") for d in self.shape))
        if self.shard_id:
            out += _pb_varint(3, self.shard_id)
        if self.offset:
            out += _pb_varint(4, self.offset)
        if self.size:
            out += _pb_varint(5, self.size)
        out += varint(6 << 3 | 5) + struct.pack("<I", self.crc32c)
        return out


def _header(num_shards: int = 1) -> bytes:
    # BundleHeaderProto: num_shards, endianness LITTLE (0, default), version {producer: 1}
    return _pb_varint(1, num_shards) + _pb_bytes(3, _pb_varint(1, BUNDLE_VERSION))


# --------------------------------------------------------------------------- LevelDB table
def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise BundleError("block too short")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise BundleError("bad block restart array")
    out, pos, key = [], 0, b""
    while pos < end:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        vlen, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + vlen > end:
            raise BundleError("corrupt block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        out.append((key, block[pos:pos + vlen]))
        pos += vlen
    return out


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    if offset + size + 5 > len(data):
        raise BundleError("block handle past the end of the file (truncated?)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    stored = struct.unpack_from("<I", data, offset + size + 1)[0]
    if unmask_crc(stored) != crc32c(data[offset:offset + size + 1]):
        raise BundleError(f"block checksum mismatch at offset {offset}")
    if kind != 0:  # TF's BundleWriter never compresses (1 would be Snappy)
        raise BundleError(f"compressed table blocks (type {kind}) are not supported")
    return contents


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` entries of a LevelDB-format table, in key order."""
    if len(data) < FOOTER_SIZE:
        raise BundleError("file too short for a table footer")
    footer = data[-FOOTER_SIZE:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise BundleError("not a TensorFlow/LevelDB table (bad magic number)")
    _, pos = read_varint(footer, 0)
    _, pos = read_varint(footer, pos)  # meta-index handle (unused)
    index_off, pos = read_varint(footer, pos)
    index_size, pos = read_varint(footer, pos)
    out = []
    for _, handle in _block_entries(_read_block(data, index_off, index_size)):
        off, p = read_varint(handle, 0)
        size, _ = read_varint(handle, p)
        out += _block_entries(_read_block(data, off, size))
    return out


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self.buf, self.restarts, self.counter, self.last = bytearray(), [0], 0, b""
        self.interval = restart_interval

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            n = min(len(self.last), len(key))
            while shared < n and self.last[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        self.last, self.counter = key, self.counter + 1

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(struct.pack("<I", r) for r in self.restarts) + \
            struct.pack("<I", len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n:
        b = start[i]
        if b < 0xFF and b + 1 < limit[i]:
            return start[:i] + bytes([b + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def build_table(items: list[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB-format table of ``items`` (sorted by key, no compression), as TF's
    ``table::TableBuilder`` with its default options writes it."""
    out = bytearray()
    index = _BlockBuilder(1)

    def write_block(contents: bytes) -> tuple[int, int]:
        off = len(out)
        out.extend(contents)
        trailer = b"\x00"
        out.extend(trailer + struct.pack("<I", mask_crc(crc32c(contents + trailer))))
        return off, len(contents)

    block, pending, last = _BlockBuilder(RESTART_INTERVAL), None, b""
    for key, value in items:
        if pending is not None:  # the previous data block's index entry
            index.add(_shortest_separator(last, key), varint(pending[0]) + varint(pending[1]))
            pending = None
        block.add(key, value)
        last = key
        if block.size() >= BLOCK_SIZE:
            pending = write_block(block.finish())
            block = _BlockBuilder(RESTART_INTERVAL)
    if block.buf:
        pending = write_block(block.finish())
    if pending is not None:
        index.add(_short_successor(last), varint(pending[0]) + varint(pending[1]))
    meta = write_block(_BlockBuilder(RESTART_INTERVAL).finish())
    idx = write_block(index.finish())
    handles = varint(meta[0]) + varint(meta[1]) + varint(idx[0]) + varint(idx[1])
    out += handles + b"\x00" * (40 - len(handles)) + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


# --------------------------------------------------------------------------- bundles
def resolve_prefix(path) -> str:
    """The bundle prefix for ``path``: a SavedModel folder (``variables/variables``), its
    ``variables/`` folder, a prefix (``.../variables/variables``, ``ckpt-10``) or the
    ``.index`` file. FileNotFoundError naming ``path`` when none of these exists."""
    p = os.fspath(path)
    for cand in (p[:-len(".index")] if p.endswith(".index") else None,
                 os.path.join(p, "variables", "variables"), os.path.join(p, "variables"), p):
        if cand and os.path.isfile(cand + ".index"):
            return cand
    raise FileNotFoundError(
        f"no TensorFlow variables bundle at {p}: expected a SavedModel folder (with "
        "variables/variables.index), its variables/ folder, or a checkpoint prefix / .index file")


def _shard_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class TensorBundle:
    """A tensor bundle opened for reading: ``entries`` (key -> :class:`BundleEntry`),
    ``get(key)`` (numpy array, CRC checked), ``object_graph`` (parsed, or None)."""

    def __init__(self, path, verify: bool = True):
        self.prefix = resolve_prefix(path)
        self.index_path = self.prefix + ".index"
        self.verify = verify
        with open(self.index_path, "rb") as f:
            raw = f.read()
        try:
            items = read_table(raw)
        except BundleError as err:
            raise BundleError(f"{self.index_path}: {err}") from None
        self.num_shards, self.entries = 1, {}
        for key, value in items:
            if key == b"":
                for num, _, val in proto_fields(value):
                    if num == 1:
                        self.num_shards = val
                    elif num == 2 and val != 0:
                        raise BundleError(f"{self.index_path}: big-endian bundles are not supported")
                continue
            self.entries[key.decode("utf-8")] = BundleEntry.parse(value)
        self._data: dict[int, bytes] = {}
        self._graph = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def variable_keys(self) -> list[str]:
        """Keys of tensors other than the object graph."""
        return [k for k in self.entries if k != OBJECT_GRAPH_KEY]

    def _shard(self, shard: int) -> bytes:
        if shard not in self._data:
            path = _shard_name(self.prefix, shard, self.num_shards)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.index_path}: data file {path} is missing")
            with open(path, "rb") as f:
                self._data[shard] = f.read()
        return self._data[shard]

    def raw(self, key: str) -> bytes:
        e = self.entries[key]
        data = self._shard(e.shard_id)
        if e.offset + e.size > len(data):
            raise BundleError(f"{self.prefix}: tensor {key!r} lies past the end of its data file (truncated?)")
        buf = data[e.offset:e.offset + e.size]
        if self.verify:
            n = int(np.prod(e.shape)) if e.shape else 1
            crc = string_tensor_crc(buf, n) if e.dtype == DT_STRING else crc32c(buf)
            if unmask_crc(e.crc32c) != crc:
                raise BundleError(f"{self.prefix}: checksum mismatch for tensor {key!r}")
        return buf

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a numpy array (bfloat16 widened to float32; strings as an
        object array of bytes)."""
        if key not in self.entries:
            raise KeyError(f"{self.prefix}: no tensor {key!r}")
        e = self.entries[key]
        if e.sliced:
            raise BundleError(f"{self.prefix}: tensor {key!r} is saved in slices (partitioned), not supported")
        buf = self.raw(key)
        n = int(np.prod(e.shape)) if e.shape else 1
        if e.dtype == DT_STRING:
            return np.array(decode_strings(buf, n), dtype=object).reshape(e.shape)
        if e.dtype not in DTYPES:
            raise BundleError(f"{self.prefix}: tensor {key!r} has unsupported dtype {e.dtype}")
        dt = DTYPES[e.dtype]
        if len(buf) != n * dt.itemsize:
            raise BundleError(f"{self.prefix}: tensor {key!r}: {len(buf)} bytes for shape {e.shape} {dt}")
        arr = np.frombuffer(buf, dtype=dt).reshape(e.shape)
        if e.dtype == DT_BFLOAT16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(dt.newbyteorder("="), copy=True) if e.dtype != DT_BFLOAT16 else arr

    @property
    def object_graph(self) -> list[dict] | None:
        if self._graph is None and OBJECT_GRAPH_KEY in self.entries:
            self._graph = parse_object_graph(self.get(OBJECT_GRAPH_KEY).reshape(-1)[0])
        return self._graph


def _string_lengths(buf: bytes, n: int) -> tuple[list[int], int]:
    lengths, pos = [], 0
    for _ in range(n):
        ln, pos = read_varint(buf, pos)
        lengths.append(ln)
    return lengths, pos


def _lengths_crc(lengths: list[int]) -> int:
    # TF checksums each length as a little-endian uint32 (uint64 above 2**32 - 1), not as
    # the varints it stores
    return crc32c(b"".join(struct.pack("<I" if ln <= 0xFFFFFFFF else "<Q", ln) for ln in lengths))


def string_tensor_crc(buf: bytes, n: int) -> int:
    """The (unmasked) CRC32C TF stores for a string tensor of ``n`` elements: lengths
    (see :func:`_lengths_crc`), the 4 stored length-checksum bytes, then the strings."""
    lengths, pos = _string_lengths(buf, n)
    return crc32c(buf[pos:], _lengths_crc(lengths))


def decode_strings(buf: bytes, n: int) -> list[bytes]:
    lengths, pos = _string_lengths(buf, n)
    stored = struct.unpack_from("<I", buf, pos)[0] if pos + 4 <= len(buf) else None
    if stored is None or unmask_crc(stored) != _lengths_crc(lengths):
        raise BundleError("string tensor: bad length checksum")
    pos += 4
    out = []
    for ln in lengths:
        out.append(bytes(buf[pos:pos + ln]))
        pos += ln
    return out


def encode_strings(values: list[bytes]) -> tuple[bytes, int]:
    """A string tensor's bytes and the (unmasked) CRC32C TF stores for it."""
    lengths = [len(v) for v in values]
    head = b"".join(varint(ln) for ln in lengths) + struct.pack("<I", mask_crc(_lengths_crc(lengths)))
    buf = head + b"".join(values)
    return buf, string_tensor_crc(buf, len(values))


def write_bundle(prefix, tensors: dict[str, np.ndarray | bytes]) -> None:
    """Write ``tensors`` (key -> numpy array, or bytes for a scalar string such as the
    object graph) as a one-shard bundle ``prefix.index`` + ``prefix.data-00000-of-00001``.

    The data file holds the tensors in the order of ``tensors`` (TensorFlow writes the
    variables in object-graph order and the object graph last); the index is sorted by
    key. Given TensorFlow's order, the files are byte-identical to TensorFlow's."""
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    items, offset = [(b"", _header())], 0
    with open(_shard_name(prefix, 0, 1), "wb") as f:
        for key, val in tensors.items():
            if isinstance(val, (bytes, bytearray)):
                buf, crc = encode_strings([bytes(val)])
                entry = BundleEntry(DT_STRING, (), 0, offset, len(buf), mask_crc(crc))
            else:
                arr = np.asarray(val)
                dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
                code = NUMPY_TO_DTYPE.get(np.dtype(dt).str)
                if code is None:
                    raise TypeError(f"{key}: unsupported dtype {arr.dtype}")
                buf = arr.astype(dt, copy=False).tobytes()
                entry = BundleEntry(code, tuple(int(s) for s in arr.shape), 0, offset, len(buf), mask_crc(crc32c(buf)))
            f.write(buf)
            offset += len(buf)
            items.append((key.encode("utf-8"), entry.serialize()))
    with open(prefix + ".index", "wb") as f:
        f.write(build_table(sorted(items)))


# --------------------------------------------------------------------------- object graph
def parse_object_graph(buf: bytes) -> list[dict]:
    """``TrackableObjectGraph`` nodes: ``{'children': [(local_name, node_id)],
    'attributes': [(name, full_name, checkpoint_key)]}``."""
    nodes = []
    for num, _, node in proto_fields(buf):
        if num != 1:
            continue
        children, attributes = [], []
        for fnum, _, val in proto_fields(node):
            if fnum == 1:
                f = {n: v for n, _, v in proto_fields(val)}
                children.append((f.get(2, b"").decode(), int(f.get(1, 0))))
            elif fnum == 2:
                f = {n: v for n, _, v in proto_fields(val)}
                attributes.append((f.get(1, b"").decode(), f.get(2, b"").decode(), f.get(3, b"").decode()))
        nodes.append({"children": children, "attributes": attributes})
    return nodes


def encode_object_graph(nodes: list[dict]) -> bytes:
    out = b""
    for node in nodes:
        body = b"".join(_pb_bytes(1, (_pb_varint(1, i) if i else b"") + _pb_bytes(2, n.encode()))
                        for n, i in node["children"])
        body += b"".join(_pb_bytes(2, _pb_bytes(1, a.encode()) + _pb_bytes(2, fn.encode()) + _pb_bytes(3, k.encode()))
                         for a, fn, k in node["attributes"])
        if node["attributes"]:
            body += _pb_bytes(5, _pb_varint(1, 1))  # has_checkpoint_values: true
        out += _pb_bytes(1, body)
    return out


def resolve_path(nodes: list[dict], path: str, attribute: str = "VARIABLE_VALUE") -> str | None:
    """The checkpoint key of ``attribute`` of the object at ``path`` (``a/b/c`` from the
    root, node 0), or None."""
    node = 0
    for part in path.split("/"):
        node = next((i for n, i in nodes[node]["children"] if n == part), None)
        if node is None:
            return None
    return next((k for a, _, k in nodes[node]["attributes"] if a == attribute), None)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.local_features.tf_bundle PATH  (SavedModel folder or checkpoint prefix)")
        raise SystemExit(2)
    b = TensorBundle(argv[0], verify=False)
    print(f"# {b.index_path}: {len(b.entries)} tensors, {b.num_shards} shard(s)")
    for k, e in b.entries.items():
        print(f"{k}\t{DTYPE_NAMES.get(e.dtype, e.dtype)}\t{list(e.shape)}")


if __name__ == "__main__":
    main()
