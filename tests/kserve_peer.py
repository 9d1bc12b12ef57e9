"""Run by the tests inside an isolated venv holding the kserve SDK (unmodified): its v2
REST client against a gpserve URL. Prints one JSON object with what it got."""
import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(url: str, model: str) -> dict:
    x = np.arange(6, dtype=np.float32).reshape(3, 2) / 4
    out = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=60)) as client:
        out["live"] = await client.is_server_live(url)
        out["ready"] = await client.is_model_ready(url, model)
        for binary in (False, True):
            inp = InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = await client.infer(url, InferRequest(model, [inp], request_id="k1"),
                                     model_name=model)
            got = res.outputs[0].as_numpy()
            out["binary" if binary else "json"] = {
                "id": res.id, "name": res.outputs[0].name, "shape": list(got.shape),
                "equal": bool(np.array_equal(got, x)), "dtype": str(got.dtype)}
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
