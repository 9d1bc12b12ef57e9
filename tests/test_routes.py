"""The v2 route table in-process: patterns, parameters, HEAD on GET routes, and the
404 and 405 answers."""
import pytest

from gpserve.oip.routes import Refused, Router


async def infer(scope, receive, model, version=None):
    return ("infer", model, version)


async def status(scope, receive, region=None):
    return ("status", region)


ROUTER = Router([("POST", "/v2/models/{model}/infer", infer),
                 ("POST", "/v2/models/{model}/versions/{version}/infer", infer),
                 ("GET", "/v2/systemsharedmemory/status", status),
                 ("GET", "/v2/systemsharedmemory/region/{region}/status", status)],
                not_found="see the docs")


def test_a_path_finds_its_handler_and_its_parameters():
    assert ROUTER.find("POST", "/v2/models/m/infer") == (infer, {"model": "m"})
    assert ROUTER.find("POST", "/v2/models/m/versions/3/infer/") == (
        infer, {"model": "m", "version": "3"})
    assert ROUTER.find("HEAD", "/v2/systemsharedmemory/region/r1/status") == (
        status, {"region": "r1"})


@pytest.mark.parametrize("method, path, status_code, says", [
    ("GET", "/v2/models/m/infer", 405, "GET is not allowed here; use POST"),
    ("POST", "/v2/systemsharedmemory/status", 405, "use GET"),
    ("POST", "/v2/models/m/predict", 404, "no route '/v2/models/m/predict'; see the docs"),
    ("GET", "/v2/models/m/versions/infer", 404, "no route"),
])
def test_a_wrong_method_is_405_and_an_unknown_path_404(method, path, status_code, says):
    with pytest.raises(Refused) as refused:
        ROUTER.find(method, path)
    assert refused.value.http_status == status_code and says in refused.value.message
