"""Requests built with the FlatBuffers library itself: another producer's layout (back to
front, vtables after tables and shared, absent defaults), and messages that lie."""
import flatbuffers
import numpy as np


def tensor_table(b: flatbuffers.Builder, ttype: int, shape, data: bytes | None = None,
                 strings=None) -> int:
    payload = b.CreateByteVector(data) if data is not None else None
    if strings is not None:
        b.StartVector(4, len(strings), 4)
        for s in reversed(strings):
            b.PrependUOffsetTRelative(s)
        payload = b.EndVector()
    dims = b.CreateNumpyVector(np.array(shape, dtype=np.int64))
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(3 if strings is not None else 2, payload, 0)
    b.PrependUOffsetTRelativeSlot(1, dims, 0)
    b.PrependUint8Slot(0, ttype, 0)
    return b.EndObject()


def finish_request(b: flatbuffers.Builder, tensors: list[int], names=()) -> bytes:
    """Wrap tensor tables already in ``b`` into an InferRequest inside a Request."""
    name_offsets = [b.CreateString(n) for n in names]
    vectors = []
    for items in (tensors, name_offsets):
        b.StartVector(4, len(items), 4)
        for o in reversed(items):
            b.PrependUOffsetTRelative(o)
        vectors.append(b.EndVector())
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(2, vectors[0], 0)
    if names:
        b.PrependUOffsetTRelativeSlot(1, vectors[1], 0)
    infer = b.EndObject()
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(1, infer, 0)
    b.PrependUint8Slot(0, 1, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())
