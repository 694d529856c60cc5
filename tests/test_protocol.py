"""Policy-server wire protocol: array encoding, schema checks, and a fuzzed decoder (hypothesis) that may only ever
produce well-formed replies — errors for garbage — through the same PolicyService the socket loop drives."""

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robot_rl.policies import make_policy
from robot_rl.policies.base import PolicyConfig
from robot_rl.serve import protocol as P
from robot_rl.serve.server import PolicyService, ServeConfig

KEYS = {"ee_pos": 3, "cube_pos": 3}
TOKEN = "fuzz-token-123"


def _stats(d, lo=-1.0, hi=1.0):
    return {"min": np.full(d, lo, np.float32), "max": np.full(d, hi, np.float32)}


@pytest.fixture(scope="module")
def service():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = PolicyConfig(kind="bc", obs_keys=list(KEYS), obs_dims=KEYS, action_dim=5, bc_hidden=[16],
                       n_action_steps=4, horizon=8)
    base = make_policy(cfg, {"ee_pos": _stats(3), "cube_pos": _stats(3), "action": _stats(5)}).freeze()
    return PolicyService(base, None, ServeConfig(token=TOKEN, max_message_bytes=64 * 1024))


def _valid_act(step=0, reset=True, session="s", id_=7):
    obs = {k: np.zeros((1, d), np.float32) for k, d in KEYS.items()}
    return P.request("act", id_, TOKEN, session=session, step=step, obs=obs, reset=reset)


def _reply(raw: bytes) -> dict:
    m = P.parse_reply(P.unpack(raw))
    assert m["type"] in ("error", "act", "metadata", "ping", "close", "push_weights")
    if m["type"] == "error":
        assert m["code"] in P.ERROR_CODES and isinstance(m["message"], str) and m["message"]
        assert m["code"] != "internal", m  # an exception escaped the request checks: a decoder bug
    return m


def test_array_round_trip_and_allow_list():
    for dt in P.DTYPES:
        a = (np.arange(24) % 3).astype(dt).reshape(2, 3, 4)
        b = P.decode_array(msgpack.unpackb(msgpack.packb(P.encode_array(a), use_bin_type=True)), "x")
        assert b.dtype == a.dtype and np.array_equal(a, b)
    with pytest.raises(P.ProtocolError) as e:
        P.encode_array(np.zeros(2, dtype=object))
    assert e.value.code == "dtype"
    bad = {"dtype": "float32", "shape": [2, 2], "data": b"\0" * 12}  # 12 bytes != 16
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array(bad, "obs.x")
    assert e.value.code == "shape" and e.value.field == "obs.x"
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array({"dtype": "float32", "shape": [2**31, 2**31], "data": b""}, "obs.x")
    assert e.value.code == "too_large"
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array({"dtype": "object", "shape": [1], "data": b"\0"}, "obs.x")
    assert e.value.code == "dtype"


def test_valid_requests_and_named_errors(service):
    m = _reply(service.process([P.pack(_valid_act())])[0])
    assert m["type"] == "act" and m["id"] == 7 and m["executed"].shape == (4, 5)
    cases = {
        "decode": b"\xc1not msgpack",
        "version": P.pack({**_valid_act(), "v": 1}),  # a v1 client (before transitions)
        "auth": P.pack({**_valid_act(), "token": "wrong"}),
        "schema": P.pack({**_valid_act(), "surprise": 1}),
        "too_large": P.pack({**_valid_act(), "obs": {"ee_pos": {"dtype": "uint8", "shape": [70000],
                                                                "data": b"\0" * 70000}}}),
    }
    wrong_dtype = _valid_act(step=1, reset=False)
    wrong_dtype["obs"]["ee_pos"] = P.encode_array(np.zeros((1, 3), np.float64))
    cases["dtype"] = P.pack(wrong_dtype)
    wrong_shape = _valid_act(step=1, reset=False)
    wrong_shape["obs"]["ee_pos"] = P.encode_array(np.zeros((1, 4), np.float32))
    cases["shape"] = P.pack(wrong_shape)
    nan = _valid_act(step=1, reset=False)
    nan["obs"]["ee_pos"] = P.encode_array(np.full((1, 3), np.nan, np.float32))
    cases["value"] = P.pack(nan)
    cases["unknown_session"] = P.pack(_valid_act(step=3, reset=False, session="nobody"))
    cases["stale_step"] = P.pack(_valid_act(step=0, reset=False, id_=8))
    for code, raw in cases.items():
        m = _reply(service.process([raw])[0])
        assert m["type"] == "error" and m["code"] == code, (code, m)
    # a retry (same id) gets the cached answer; the session survived all of that and steps on
    assert _reply(service.process([P.pack(_valid_act(step=0, reset=False))])[0])["step"] == 0
    assert _reply(service.process([P.pack(_valid_act(step=1, reset=False, id_=9))])[0])["step"] == 1


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**64 + 1, 2**64 - 1), st.floats(), st.text(max_size=20),
                  st.binary(max_size=64))
_obj = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=5),
                                                st.dictionaries(st.text(max_size=8), c, max_size=5)), max_leaves=25)
_fields = st.sampled_from(["v", "type", "id", "token", "session", "step", "obs", "reset", "seed", "new_chunk",
                           "version", "weights", "config", "dtype", "shape", "data"])


def _safe_pack(o):
    try:
        return msgpack.packb(o, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\x92"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=512))
def test_fuzz_random_bytes(service, raw):
    m = _reply(service.process([raw])[0])
    assert m["type"] == "error"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=_obj)
def test_fuzz_random_msgpack(service, obj):
    m = _reply(service.process([_safe_pack(obj)])[0])
    assert m["type"] == "error"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=_fields, value=_obj, where=st.sampled_from(["top", "obs", "array", "push"]), cut=st.integers(0, 400))
def test_fuzz_mutated_requests(service, field, value, where, cut):
    """Valid requests with one field replaced by an arbitrary value, or truncated: a well-formed reply, always."""
    m = _valid_act(step=0, reset=True, session="fz")
    if where == "push":
        m = P.request("push_weights", 3, TOKEN, version=1, weights=b"\x08\0\0\0\0\0\0\0{}      ",
                      config={"obs_keys": list(KEYS), "obs_dims": KEYS, "action_dim": 5, "hidden": [8]})
        m[field] = value
    elif where == "top":
        m[field] = value
    elif where == "obs":
        m["obs"][field] = value
    else:
        m["obs"]["ee_pos"][field] = value
    raw = _safe_pack(m)
    for r in (raw, raw[:cut]):
        _reply(service.process([r])[0])


@pytest.mark.parametrize("address,ok", [("127.0.0.1:5555", True), ("robot-pc:5555", True), ("[::1]:5555", True),
                                        ("::1:5555", False), ("bad host:5555", False), ("tcp://*:5555", False),
                                        ("ipc:///tmp/x", False), ("host:0", False)])
def test_client_addresses(address, ok):
    from robot_rl.errors import ConfigError
    from robot_rl.serve.client import normalize_address

    if ok:
        assert normalize_address(address).startswith("tcp://")
    else:
        with pytest.raises(ConfigError) as e:
            normalize_address(address)
        assert e.value.field == "server"


def test_client_deadlines_and_request_fields():
    from robot_rl.errors import ConfigError
    from robot_rl.serve.client import PolicyClient, _int

    for t in (float("inf"), "2", 0, True):
        with pytest.raises(ConfigError) as e:
            PolicyClient("127.0.0.1:5555", timeout_s=t)
        assert e.value.field == "timeout_s"
    assert _int("seed", np.int64(3)) == 3 and type(_int("seed", np.int64(3))) is int
    with pytest.raises(ConfigError, match="step"):
        _int("step", "x")
