"""AMF0 (Adobe AMF0 spec) encode/decode, plus the AMF3 subset RTMP clients send (AMF3 spec).

Python mapping: number -> float, boolean -> bool, string/long string -> str, object -> dict,
null -> None, undefined -> :data:`UNDEFINED`, ECMA array -> :class:`EcmaArray`, strict array ->
list, date -> :class:`AmfDate`, XML -> :class:`XmlDocument`, typed object -> :class:`TypedObject`.
The AMF0 marker 0x11 ("avmplus-object", AMF0 spec 3.1) switches one value to AMF3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

from marchproxy_common.wire.rtmp.errors import RtmpProtocolError

#: nesting depth cap for objects/arrays (hostile input must not blow the stack)
MAX_DEPTH = 32
#: element count cap for one array/object (before reading its items)
MAX_ITEMS = 1 << 16
#: reference tables cap
MAX_REFERENCES = 1 << 16

NUMBER, BOOLEAN, STRING, OBJECT, MOVIECLIP, NULL, UNDEFINED_M, REFERENCE, ECMA_ARRAY = range(9)
OBJECT_END, STRICT_ARRAY, DATE, LONG_STRING, UNSUPPORTED, RECORDSET, XML_DOC = range(9, 16)
TYPED_OBJECT, AVMPLUS = 16, 17

_F64 = struct.Struct(">d")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class _Undefined:
    _inst: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = _Undefined()


class EcmaArray(dict[str, "AmfValue"]):
    """An associative array (AMF0 marker 0x08); onMetaData is usually one."""


class XmlDocument(str):
    pass


@dataclass(frozen=True, slots=True)
class AmfDate:
    milliseconds: float
    timezone: int = 0


@dataclass(slots=True)
class TypedObject:
    class_name: str
    properties: dict[str, AmfValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ByteArray:
    """AMF3 ByteArray (decoded only)."""

    data: bytes


AmfValue = Union[  # noqa: UP007 - recursive alias needs the Union spelling at runtime
    float,
    int,
    bool,
    str,
    None,
    _Undefined,
    dict[str, "AmfValue"],
    list["AmfValue"],
    AmfDate,
    TypedObject,
    ByteArray,
]


# ---------------------------------------------------------------- encoding (AMF0)


def _enc_str_body(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise RtmpProtocolError("AMF0 short string longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _enc_props(props: dict[str, AmfValue], out: list[bytes], depth: int) -> None:
    for k, v in props.items():
        if k == "":
            raise RtmpProtocolError("AMF0 object property with empty name")
        out.append(_enc_str_body(k))
        _enc(v, out, depth + 1)
    out.append(b"\x00\x00\x09")


def _enc(value: AmfValue, out: list[bytes], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise RtmpProtocolError("AMF0 value nested too deeply")
    if value is None:
        out.append(b"\x05")
    elif value is UNDEFINED:
        out.append(b"\x06")
    elif isinstance(value, bool):
        out.append(b"\x01\x01" if value else b"\x01\x00")
    elif isinstance(value, int | float):
        out.append(b"\x00" + _F64.pack(float(value)))
    elif isinstance(value, XmlDocument):
        raw = value.encode("utf-8")
        out.append(b"\x0f" + _U32.pack(len(raw)) + raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        if len(raw) <= 0xFFFF:
            out.append(b"\x02" + _U16.pack(len(raw)) + raw)
        else:
            out.append(b"\x0c" + _U32.pack(len(raw)) + raw)
    elif isinstance(value, EcmaArray):
        out.append(b"\x08" + _U32.pack(len(value)))
        _enc_props(value, out, depth)
    elif isinstance(value, dict):
        out.append(b"\x03")
        _enc_props(value, out, depth)
    elif isinstance(value, list):
        out.append(b"\x0a" + _U32.pack(len(value)))
        for item in value:
            _enc(item, out, depth + 1)
    elif isinstance(value, AmfDate):
        out.append(b"\x0b" + _F64.pack(value.milliseconds) + struct.pack(">h", value.timezone))
    elif isinstance(value, TypedObject):
        out.append(b"\x10" + _enc_str_body(value.class_name))
        _enc_props(value.properties, out, depth)
    else:
        raise RtmpProtocolError(f"cannot encode {type(value).__name__} as AMF0")


def encode(*values: AmfValue) -> bytes:
    out: list[bytes] = []
    for v in values:
        _enc(v, out)
    return b"".join(out)


# ---------------------------------------------------------------- decoding (AMF0)


class _Reader:
    __slots__ = ("data", "o3", "pos", "refs", "s3", "t3")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.refs: list[AmfValue] = []
        self.s3: list[str] = []  # AMF3 string table
        self.o3: list[AmfValue] = []  # AMF3 object table
        self.t3: list[tuple[str, bool, list[str]]] = []  # AMF3 traits table

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise RtmpProtocolError("truncated AMF data")
        b = self.data[self.pos : end]
        self.pos = end
        return b

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise RtmpProtocolError("truncated AMF data")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def f64(self) -> float:
        return float(_F64.unpack(self.take(8))[0])

    def utf8(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RtmpProtocolError("invalid UTF-8 in AMF string") from exc

    def add_ref(self, v: AmfValue) -> None:
        if len(self.refs) >= MAX_REFERENCES:
            raise RtmpProtocolError("too many AMF0 references")
        self.refs.append(v)


def _props(r: _Reader, target: dict[str, AmfValue], depth: int) -> None:
    for _ in range(MAX_ITEMS + 1):
        key = r.utf8(r.u16())
        if key == "":
            if r.byte() != OBJECT_END:
                raise RtmpProtocolError("AMF0 object property with empty name")
            return
        target[key] = _dec(r, depth + 1)
    raise RtmpProtocolError("AMF0 object has too many properties")


def _dec(r: _Reader, depth: int) -> AmfValue:  # noqa: C901 - one branch per marker
    if depth > MAX_DEPTH:
        raise RtmpProtocolError("AMF0 value nested too deeply")
    m = r.byte()
    if m == NUMBER:
        return r.f64()
    if m == BOOLEAN:
        return r.byte() != 0
    if m == STRING:
        return r.utf8(r.u16())
    if m == OBJECT:
        obj: dict[str, AmfValue] = {}
        r.add_ref(obj)
        _props(r, obj, depth)
        return obj
    if m in (NULL, UNSUPPORTED):
        return None
    if m == UNDEFINED_M:
        return UNDEFINED
    if m == REFERENCE:
        idx = r.u16()
        if idx >= len(r.refs):
            raise RtmpProtocolError("AMF0 reference out of range")
        return r.refs[idx]
    if m == ECMA_ARRAY:
        r.u32()  # advisory count; the list is terminated by an object end marker
        arr = EcmaArray()
        r.add_ref(arr)
        _props(r, arr, depth)
        return arr
    if m == STRICT_ARRAY:
        n = r.u32()
        if n > MAX_ITEMS or n > len(r.data) - r.pos:
            raise RtmpProtocolError("AMF0 strict array too long")
        items: list[AmfValue] = []
        r.add_ref(items)
        for _ in range(n):
            items.append(_dec(r, depth + 1))
        return items
    if m == DATE:
        ms = r.f64()
        tz = struct.unpack(">h", r.take(2))[0]
        return AmfDate(ms, int(tz))
    if m == LONG_STRING:
        return r.utf8(r.u32())
    if m == XML_DOC:
        return XmlDocument(r.utf8(r.u32()))
    if m == TYPED_OBJECT:
        name = r.utf8(r.u16())
        typed = TypedObject(name)
        r.add_ref(typed)
        _props(r, typed.properties, depth)
        return typed
    if m == AVMPLUS:
        return _dec3(r, depth + 1)
    raise RtmpProtocolError(f"unsupported AMF0 marker 0x{m:02x}")


def decode(data: bytes) -> list[AmfValue]:
    """Decode every AMF0 value in ``data``."""
    r = _Reader(data)
    values: list[AmfValue] = []
    while r.pos < len(data):
        if len(values) >= MAX_ITEMS:
            raise RtmpProtocolError("too many AMF0 values")
        values.append(_dec(r, 0))
    return values


def decode_one(data: bytes, pos: int = 0) -> tuple[AmfValue, int]:
    """Decode one AMF0 value at ``pos``; return it and the position after it."""
    r = _Reader(data, pos)
    return _dec(r, 0), r.pos


# ---------------------------------------------------------------- AMF3 (decode + small encode)


def _u29(r: _Reader) -> int:
    v = 0
    for i in range(4):
        b = r.byte()
        if i == 3:
            return (v << 8) | b
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v
    return v  # pragma: no cover


def _str3(r: _Reader) -> str:
    h = _u29(r)
    if not h & 1:
        idx = h >> 1
        if idx >= len(r.s3):
            raise RtmpProtocolError("AMF3 string reference out of range")
        return r.s3[idx]
    s = r.utf8(h >> 1)
    if s:
        if len(r.s3) >= MAX_REFERENCES:
            raise RtmpProtocolError("too many AMF3 strings")
        r.s3.append(s)
    return s


def _obj_ref(r: _Reader, h: int) -> AmfValue:
    idx = h >> 1
    if idx >= len(r.o3):
        raise RtmpProtocolError("AMF3 object reference out of range")
    return r.o3[idx]


def _add3(r: _Reader, v: AmfValue) -> None:
    if len(r.o3) >= MAX_REFERENCES:
        raise RtmpProtocolError("too many AMF3 objects")
    r.o3.append(v)


def _object3(r: _Reader, depth: int) -> AmfValue:
    h = _u29(r)
    if not h & 1:
        return _obj_ref(r, h)
    if not h & 2:
        idx = h >> 2
        if idx >= len(r.t3):
            raise RtmpProtocolError("AMF3 traits reference out of range")
        class_name, dynamic, names = r.t3[idx]
    else:
        if h & 4:
            raise RtmpProtocolError("AMF3 externalizable objects are not supported")
        dynamic = bool(h & 8)
        count = h >> 4
        if count > MAX_ITEMS:
            raise RtmpProtocolError("AMF3 object has too many sealed members")
        class_name = _str3(r)
        names = [_str3(r) for _ in range(count)]
        if len(r.t3) >= MAX_REFERENCES:
            raise RtmpProtocolError("too many AMF3 traits")
        r.t3.append((class_name, dynamic, names))
    props: dict[str, AmfValue] = {}
    result: AmfValue = TypedObject(class_name, props) if class_name else props
    _add3(r, result)
    for name in names:
        props[name] = _dec3(r, depth + 1)
    if dynamic:
        for _ in range(MAX_ITEMS + 1):
            key = _str3(r)
            if key == "":
                break
            props[key] = _dec3(r, depth + 1)
        else:
            raise RtmpProtocolError("AMF3 object has too many members")
    return result


def _array3(r: _Reader, depth: int) -> AmfValue:
    h = _u29(r)
    if not h & 1:
        return _obj_ref(r, h)
    n = h >> 1
    if n > MAX_ITEMS or n > len(r.data) - r.pos:
        raise RtmpProtocolError("AMF3 array too long")
    assoc: dict[str, AmfValue] = {}
    items: list[AmfValue] = []
    _add3(r, items)
    for _ in range(MAX_ITEMS + 1):
        key = _str3(r)
        if key == "":
            break
        assoc[key] = _dec3(r, depth + 1)
    else:
        raise RtmpProtocolError("AMF3 array has too many named members")
    for _ in range(n):
        items.append(_dec3(r, depth + 1))
    if assoc:
        ecma = EcmaArray(assoc)
        for i, v in enumerate(items):
            ecma[str(i)] = v
        r.o3[r.o3.index(items)] = ecma
        return ecma
    return items


def _dec3(r: _Reader, depth: int) -> AmfValue:
    if depth > MAX_DEPTH:
        raise RtmpProtocolError("AMF3 value nested too deeply")
    m = r.byte()
    if m == 0:
        return UNDEFINED
    if m == 1:
        return None
    if m in (2, 3):
        return m == 3
    if m == 4:
        v = _u29(r)
        return float(v - (1 << 29) if v & (1 << 28) else v)
    if m == 5:
        return r.f64()
    if m == 6:
        return _str3(r)
    if m in (7, 11, 12, 8):
        h = _u29(r)
        if not h & 1:
            return _obj_ref(r, h)
        if m == 8:
            out: AmfValue = AmfDate(r.f64())
        elif m == 12:
            out = ByteArray(r.take(h >> 1))
        else:
            out = XmlDocument(r.utf8(h >> 1))
        _add3(r, out)
        return out
    if m == 9:
        return _array3(r, depth)
    if m == 10:
        return _object3(r, depth)
    raise RtmpProtocolError(f"unsupported AMF3 marker 0x{m:02x}")


def decode_amf3(data: bytes) -> list[AmfValue]:
    """Decode a sequence of AMF3 values."""
    r = _Reader(data)
    values: list[AmfValue] = []
    while r.pos < len(data):
        if len(values) >= MAX_ITEMS:
            raise RtmpProtocolError("too many AMF3 values")
        values.append(_dec3(r, 0))
    return values


def _enc_u29(v: int) -> bytes:
    if v < 0 or v >= 1 << 29:
        raise RtmpProtocolError("U29 out of range")
    if v < 0x80:
        return bytes([v])
    if v < 0x4000:
        return bytes([(v >> 7) | 0x80, v & 0x7F])
    if v < 0x200000:
        return bytes([(v >> 14) | 0x80, ((v >> 7) & 0x7F) | 0x80, v & 0x7F])
    return bytes([(v >> 22) | 0x80, ((v >> 15) & 0x7F) | 0x80, ((v >> 8) & 0x7F) | 0x80, v & 0xFF])


def _enc_str3(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _enc_u29((len(raw) << 1) | 1) + raw


def _enc3(value: AmfValue, out: list[bytes], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise RtmpProtocolError("AMF3 value nested too deeply")
    if value is UNDEFINED:
        out.append(b"\x00")
    elif value is None:
        out.append(b"\x01")
    elif isinstance(value, bool):
        out.append(b"\x03" if value else b"\x02")
    elif isinstance(value, int | float):
        out.append(b"\x05" + _F64.pack(float(value)))
    elif isinstance(value, str):
        out.append(b"\x06" + _enc_str3(value))
    elif isinstance(value, list):
        out.append(b"\x09" + _enc_u29((len(value) << 1) | 1) + b"\x01")
        for item in value:
            _enc3(item, out, depth + 1)
    elif isinstance(value, dict):
        out.append(b"\x0a\x0b\x01")  # inline, inline traits, dynamic, 0 sealed, anonymous
        for k, v in value.items():
            if k == "":
                raise RtmpProtocolError("AMF3 dynamic member with empty name")
            out.append(_enc_str3(k))
            _enc3(v, out, depth + 1)
        out.append(b"\x01")
    else:
        raise RtmpProtocolError(f"cannot encode {type(value).__name__} as AMF3")


def encode_amf3(*values: AmfValue) -> bytes:
    """AMF3 encoding without reference tables (every value inline); enough for tests/clients."""
    out: list[bytes] = []
    for v in values:
        _enc3(v, out)
    return b"".join(out)
