"""Who may call a restricted API group (system shared memory), in process: the policy
alone, with the addresses and headers a call would bring."""
import pytest

from gpserve.errors import Forbidden
from gpserve.oip.restricted import Restrictions, grpc_peer_host


def headers(**given):
    return lambda key: given.get(key.replace("-", "_"))


def test_loopback_only_by_default_and_any_on_request():
    r = Restrictions.parse("")
    for host in ("127.0.0.1", "127.5.6.7", "::1", "[::1]"):
        r.check("shared-memory", host, headers())
    for host in ("10.0.0.8", "192.168.1.2", "2001:db8::1", None, "", "not-an-address"):
        with pytest.raises(Forbidden, match="from this host only"):
            r.check("shared-memory", host, headers())
    Restrictions.parse("", "any").check("shared-memory", "10.0.0.8", headers())


def test_a_required_header_is_compared_and_never_echoed():
    r = Restrictions.parse("shared-memory:Admin-Key=s3cret", "any")
    r.check("shared-memory", "10.0.0.8", headers(admin_key="s3cret"))
    r.check("shared-memory", "10.0.0.8", headers(admin_key=b"s3cret"))   # REST: bytes
    for got in (None, "", "S3CRET", "s3cret ", "s3cre"):
        with pytest.raises(Forbidden) as e:
            r.check("shared-memory", "10.0.0.8", headers(admin_key=got))
        assert e.value.http_status == 403 and "'admin-key'" in e.value.message
        assert "s3cret" not in e.value.message
    with pytest.raises(Forbidden, match="this host only"):           # both rules at once
        Restrictions.parse("shared-memory:k=v").check("shared-memory", "10.0.0.8",
                                                      headers(k="v"))


@pytest.mark.parametrize("spec,words", [
    ("shared-memory", "GROUP[,GROUP]:KEY=VALUE"),
    ("shared-memory:key", "GROUP[,GROUP]:KEY=VALUE"),
    ("shared-memory:=v", "GROUP[,GROUP]:KEY=VALUE"),
    ("model-control:k=v", "unknown API group 'model-control'"),
    ("shared-memory:a=1;shared-memory:b=2", "restricted twice"),
])
def test_bad_specs_are_refused_at_start(spec, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        Restrictions.parse(spec)
    with pytest.raises(ValueError, match="expected one of"):
        Restrictions.parse("", "everyone")


def test_grpc_peers():
    assert grpc_peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert grpc_peer_host("ipv6:[::1]:5000") == "::1"
    assert grpc_peer_host("unix:/tmp/sock") is None
