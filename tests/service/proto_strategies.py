"""Hypothesis strategies for ANY protobuf message, derived from its descriptor (never a hand-written list of
fields): every field of every message the API serves is drawn by its declared type, so a field added to the
proto is fuzzed without touching this module.

- scalars by type, with the edge values that break code: huge and negative integers, NaN and infinities,
  empty, long, control, format and bidirectional-override characters; enums as any int32 (proto3 enums are
  open, so unknown numbers reach the server);
- strings also draw from a pool of *plausible* values (``hints``: ids the server knows, method names, paths)
  so that examples get past the first check and reach the deep code;
- oneofs set at most one member; maps by key and value type; nested messages (``Struct``/``Value``
  included, which are recursive) down to a depth limit;
- :func:`mutated_bytes` turns a serialized message into garbage the way transport and client bugs do
  (truncation, bit flips, spliced bytes, wrong wire types).
"""

from __future__ import annotations

import math

from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import strategies as st

MAX_DEPTH = 4
MAX_REPEATED = 6

HOSTILE_TEXT = ["", " ", "\x00", "a\x00b", "\u202egpj.exe", "\u2066x\u2069", "\u200b", "line\nbreak", "\x07\x1b[2J",
                "é", "💥", "x" * 300, "\ufeffbom", "../../etc/passwd", "%s%n", "'; DROP TABLE requests; --"]


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e-308, 0.5, 1.0]),
                     st.floats(allow_nan=True, allow_infinity=True, width=width))


_INTS = {
    d.FieldDescriptor.TYPE_INT32: (-(2 ** 31), 2 ** 31 - 1), d.FieldDescriptor.TYPE_SINT32: (-(2 ** 31), 2 ** 31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2 ** 31), 2 ** 31 - 1), d.FieldDescriptor.TYPE_UINT32: (0, 2 ** 32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2 ** 32 - 1), d.FieldDescriptor.TYPE_INT64: (-(2 ** 63), 2 ** 63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2 ** 63), 2 ** 63 - 1), d.FieldDescriptor.TYPE_SFIXED64: (-(2 ** 63), 2 ** 63 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2 ** 64 - 1), d.FieldDescriptor.TYPE_FIXED64: (0, 2 ** 64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 3, 9, 10, 100, 1000, 10001, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _text(hints: list[str]) -> st.SearchStrategy[str]:
    arbitrary = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
    options = [st.sampled_from(HOSTILE_TEXT), arbitrary, st.text(alphabet="abc-_0123456789", max_size=12)]
    if hints:
        options = [st.sampled_from(hints)] * 3 + options  # plausible values reach past the first checks
    return st.one_of(*options)


def scalar(field: d.FieldDescriptor, hints: dict[str, list[str]]) -> st.SearchStrategy:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_STRING:
        return _text(hints.get(field.name, []) + hints.get("*", []))
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == d.FieldDescriptor.TYPE_DOUBLE:
        return _floats(64)
    if kind == d.FieldDescriptor.TYPE_FLOAT:
        return _floats(32)
    if kind == d.FieldDescriptor.TYPE_ENUM:
        declared = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(declared), _integers(-(2 ** 31), 2 ** 31 - 1))
    if kind in _INTS:
        return _integers(*_INTS[kind])
    raise TypeError(f"no strategy for field type {kind} of {field.full_name}")


def messages(descriptor: d.Descriptor, hints: dict[str, list[str]] | None = None,
             depth: int = 0) -> st.SearchStrategy:
    """Messages of type ``descriptor`` with arbitrary (often invalid) content."""
    hints = hints or {}
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw):
        message = cls()
        chosen = {oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in descriptor.oneofs
                  if not oneof.name.startswith("_")}  # synthetic oneofs of proto3 'optional' are plain fields
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in chosen:
                if chosen[oneof.name] is not field:
                    continue
            elif not draw(st.booleans()):
                continue
            _fill(draw, message, field, hints, depth)
        return message

    return build()


def _fill(draw, message, field: d.FieldDescriptor, hints: dict[str, list[str]], depth: int) -> None:
    is_message = field.type == d.FieldDescriptor.TYPE_MESSAGE
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == d.FieldDescriptor.LABEL_REPEATED
    if is_message and depth >= MAX_DEPTH:
        return
    if is_message and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        container = getattr(message, field.name)
        for key in draw(st.lists(scalar(key_field, hints), max_size=MAX_REPEATED, unique=True)):
            if value_field.type == d.FieldDescriptor.TYPE_MESSAGE:
                container[key].CopyFrom(draw(messages(value_field.message_type, hints, depth + 1)))
            else:
                container[key] = draw(scalar(value_field, hints))
        return
    if repeated:
        count = draw(st.integers(0, MAX_REPEATED))
        container = getattr(message, field.name)
        for _ in range(count):
            if is_message:
                container.add().CopyFrom(draw(messages(field.message_type, hints, depth + 1)))
            else:
                container.append(draw(scalar(field, hints)))
        return
    if is_message:
        getattr(message, field.name).CopyFrom(draw(messages(field.message_type, hints, depth + 1)))
    else:
        setattr(message, field.name, draw(scalar(field, hints)))


@st.composite
def mutated_bytes(draw, seeds: list[bytes]) -> bytes:
    """Garbage shaped like a message: a serialized seed truncated, bit-flipped, spliced or with a wrong wire
    type, or plain random bytes."""
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice", "wire", "varint"]))
    if kind == "random" or not seeds:
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(seeds)))
    if not data:
        return draw(st.binary(min_size=1, max_size=32))
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, max(len(data) - 1, 0)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "splice":
        position = draw(st.integers(0, len(data)))
        return bytes(data[:position]) + draw(st.binary(min_size=1, max_size=32)) + bytes(data[position:])
    if kind == "wire":  # the first tag's wire type changed: a string read as a varint, a group start...
        data[0] = (data[0] & ~0x07) | draw(st.integers(0, 7))
        return bytes(data)
    return bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) + bytes(data)  # a length-delimited field of 4 GiB
