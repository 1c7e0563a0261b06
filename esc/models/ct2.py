"""Read (and, for tests, write) CTranslate2 ``model.bin`` files without CTranslate2.

Binary layout (little endian; versions 4 to 6 are supported, as written by CTranslate2 >= 2.x):

* ``uint32`` binary version;
* the spec name (a string) and ``uint32`` spec revision;
* ``uint32`` variable count, then for each variable: its name (a string), ``uint8`` rank,
  ``rank`` x ``uint32`` dimensions, ``uint8`` dtype (see :data:`DTYPES`), ``uint32`` byte count,
  and the raw little-endian bytes;
* ``uint32`` alias count, then for each alias: alias name and target name (two strings).

A string is a ``uint16`` length followed by that many bytes, the last one a NUL terminator
(the reader also accepts strings without it). Rank-0 variables are scalar settings of the spec
(``decoder/num_heads``, ``decoder/pre_norm``...), not weights.
"""
from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

log = logging.getLogger(__name__)

#: CTranslate2 DataType codes -> numpy dtypes (bfloat16 is read as its raw uint16 bits, then widened).
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
SUPPORTED_VERSIONS = (4, 5, 6)


class CT2FormatError(ValueError):
    """The bytes are not a CTranslate2 model.bin this reader understands."""


@dataclass
class CT2Model:
    """The content of a model.bin.

    Attributes:
        spec: spec name (``WhisperSpec``, ``TransformerSpec``...).
        revision: spec revision.
        version: binary format version.
        variables: name -> array (rank-0 arrays are scalar settings); bfloat16 is returned as float32.
        aliases: alias name -> target variable name (e.g. a tied output projection).
    """

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        """The variable ``name``, following aliases."""
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise CT2FormatError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        if name not in self.variables:
            raise KeyError(f"{name!r} is not a variable of this {self.spec} model (nor an alias of one)")
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    @property
    def scalars(self) -> dict[str, float | int]:
        """The rank-0 variables (spec settings) as Python numbers."""
        return {k: v.item() for k, v in self.variables.items() if v.ndim == 0}

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The variables of rank >= 1."""
        return {k: v for k, v in self.variables.items() if v.ndim > 0}


class _Reader:
    def __init__(self, f: BinaryIO, source: str) -> None:
        self.f, self.source = f, source

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise CT2FormatError(f"{self.source}: truncated file (wanted {n} bytes at offset {self.f.tell() - len(b)}, "
                                 f"got {len(b)}); are all parts of a split model.bin given, in order?")
        return b

    def num(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.read(self.num("H"))
        return raw.rstrip(b"\x00").decode("utf-8")


class _ConcatStream(io.RawIOBase):
    """Several files read as one stream (a model.bin split into parts)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.i, self.cur = paths, 0, open(paths[0], "rb")
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            n = self.cur.readinto(b)
            if n or self.i == len(self.paths) - 1:
                self.pos += n or 0
                return n or 0
            self.cur.close()
            self.i += 1
            self.cur = open(self.paths[self.i], "rb")

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.cur.close()
        super().close()


def read_ct2(source: str | Path | bytes | Iterable[str | Path]) -> CT2Model:
    """Read a CTranslate2 ``model.bin``.

    Args:
        source: a path, the file's bytes, or a list of paths whose concatenation is the file
            (a model.bin split into parts), in order.

    Raises:
        CT2FormatError: unsupported version, truncated or malformed data.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream, name = io.BytesIO(bytes(source)), "<bytes>"
    else:
        paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
        if not paths:
            raise CT2FormatError("read_ct2 got an empty list of parts")
        for p in paths:
            if not p.is_file():
                raise CT2FormatError(f"model file part not found: {p}")
        stream = io.BufferedReader(_ConcatStream(paths), buffer_size=1 << 20)
        name = " + ".join(str(p) for p in paths)
    try:
        return _read(_Reader(stream, name))
    finally:
        stream.close()


def _read(r: _Reader) -> CT2Model:
    version = r.num("I")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(f"{r.source}: CTranslate2 binary version {version} is not supported "
                             f"(supported: {SUPPORTED_VERSIONS}); re-convert the model with a recent ct2 converter")
    model = CT2Model(spec=r.string(), revision=r.num("I"), version=version)
    for _ in range(r.num("I")):
        name = r.string()
        rank = r.num("B")
        dims = [r.num("I") for _ in range(rank)]
        code = r.num("B")
        nbytes = r.num("I")
        if code not in DTYPES:
            raise CT2FormatError(f"{r.source}: variable {name!r} has unknown dtype code {code} (known: {sorted(DTYPES)})")
        raw = r.read(nbytes)
        dtype = DTYPES[code]
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        expected = int(np.prod(dims)) if dims else 1
        if arr.size != expected:
            raise CT2FormatError(f"{r.source}: variable {name!r} holds {arr.size} values for shape {dims}")
        model.variables[name] = arr.reshape(dims).copy() if dims else arr.reshape(()).copy()
    if version >= 3:
        for _ in range(r.num("I")):
            alias = r.string()
            model.aliases[alias] = r.string()
    rest = r.f.read()
    if rest:
        log.warning("%s: %d trailing bytes after the aliases were ignored", r.source, len(rest))
    return model


_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.float16): 4}


def write_ct2(path: str | Path, spec: str, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              revision: int = 1, version: int = 6) -> Path:
    """Write ``variables`` (name -> array; rank-0 arrays for settings) as a CTranslate2 model.bin.

    Names are written NUL-terminated, as CTranslate2 does. Used by the tests to build tiny models.
    Supported dtypes: float32, int8, int16, int32, float16.
    """
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(f"cannot write binary version {version}; use one of {SUPPORTED_VERSIONS}")

    def string(s: str) -> bytes:
        b = s.encode("utf-8") + b"\x00"
        return struct.pack("<H", len(b)) + b

    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", version) + string(spec) + struct.pack("<I", revision))
        f.write(struct.pack("<I", len(variables)))
        for name, value in variables.items():
            arr = np.asarray(value)  # (ascontiguousarray would turn rank-0 settings into rank 1)
            if arr.dtype not in _CODES:
                raise CT2FormatError(f"variable {name!r}: dtype {arr.dtype} cannot be written (use one of {list(_CODES)})")
            raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            f.write(string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
            f.write(struct.pack("<BI", _CODES[arr.dtype], len(raw)) + raw)
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(string(alias) + string(target))
    return path
