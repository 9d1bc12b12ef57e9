"""Runs the unmodified ``graphpipe`` 1.0.4 client in its own process, for compatibility tests.

graphpipe 1.0.4 needs flatbuffers 1.x, the project uses a current flatbuffers, so the
tests install graphpipe and flatbuffers 1.12 into a folder of their own and run this
script with that folder first on ``PYTHONPATH``. It reads a pickled list of
``(operation, args)`` from stdin and writes a pickled list of results to stdout; a
failed operation yields ``{"error": type, "message": str, "status": int | None}``.
"""
import pickle
import sys

import numpy as np
from graphpipe import convert, remote
from graphpipe.graphpipefb import Request


def _metadata_dict(m):
    def ios(count, get):
        return [{"name": get(i).Name().decode(), "shape": get(i).ShapeAsNumpy().tolist()
                 if get(i).ShapeLength() else [], "type": get(i).Type(),
                 "description": (get(i).Description() or b"").decode()} for i in range(count)]
    return {"name": (m.Name() or b"").decode(), "version": (m.Version() or b"").decode(),
            "server": (m.Server() or b"").decode(),
            "description": (m.Description() or b"").decode(),
            "inputs": ios(m.InputsLength(), m.Inputs),
            "outputs": ios(m.OutputsLength(), m.Outputs)}


OPS = {
    "encode_request": lambda arrays, names, out_names, config: bytes(
        convert.serialize_infer_request(convert.InferReq(config, arrays, names, out_names))),
    "encode_metadata_request": lambda: bytes(convert.serialize_metadata_request()),
    "decode_request": lambda body: (lambda r: (r.config, r.input_names, r.input_tensors,
                                               r.output_names))(convert.deserialize_request(body)),
    "request_type": lambda body: Request.Request.GetRootAsRequest(body, 0).ReqType(),
    "encode_response": lambda arrays: bytes(convert.serialize_infer_response(arrays)),
    "decode_response": lambda body: convert.deserialize_infer_response(body),
    "encode_metadata_response": lambda meta: bytes(convert.serialize_metadata_response(meta)),
    "decode_metadata_response": lambda body: _metadata_dict(
        convert.deserialize_metadata_response(body)),
    "execute": lambda uri, array, input_name=None, output_name=None: remote.execute(
        uri, array, input_name, output_name),
    "execute_multi": lambda uri, inputs, input_names, output_names, config=None:
        remote.execute_multi(uri, inputs, input_names, output_names, config),
    "metadata": lambda uri: _metadata_dict(remote.metadata(uri)),
}


def main():
    calls = pickle.load(sys.stdin.buffer)
    results = []
    for op, args in calls:
        try:
            results.append(OPS[op](*args))
        except Exception as e:  # reported to the test, which asserts on it
            status = getattr(getattr(e, "response", None), "status_code", None)
            body = getattr(getattr(e, "response", None), "content", None)
            results.append({"error": type(e).__name__, "message": str(e),
                            "status": status, "body": body})
    pickle.dump(results, sys.stdout.buffer)


if __name__ == "__main__":
    np.set_printoptions(threshold=10)
    main()
