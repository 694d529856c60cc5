"""Wire protocol of the policy server, version :data:`PROTOCOL_VERSION` (ZeroMQ transport, msgpack messages).

Transport: one ZeroMQ ROUTER socket on the server, one DEALER socket per client (``tcp://host:port``). Every message
is ONE ZeroMQ frame holding ONE msgpack map (``use_bin_type``: ``str`` is text, ``bytes`` is binary). Nothing on the
wire is ever unpickled: msgpack only yields nil/bool/int/float/str/bin/array/map (extension types are refused), and
every field is checked here against an explicit schema before the server looks at it.

Common fields of every request::

    {"v": 3, "type": <str>, "id": <int 0..2**63-1, echoed in the reply>, "token": <str, only if the server wants one>}

Request types (extra fields):

- ``metadata`` — none. Reply: observation/action spec, horizons, control rate, normalization, versions, limits.
- ``act`` — ``session`` (str, 1..128 printable ASCII chars), ``step`` (int >= 0, the control step of the newest
  frame), ``obs`` ({key: array} with a leading frames axis: shape (F, *spec shape), 1 <= F <= n_obs_steps, the
  frames of steps ``step-F+1 .. step``), optional ``reset`` (bool: start the session's episode here), ``seed``
  (int, with reset: seeds the session's diffusion noise generator), ``new_chunk`` (bool: run the base policy now
  even if the session still has queued actions). Reply ``act`` (see :func:`act_reply`).
- ``push_weights`` — ``version`` (int, strictly greater than the served residual version), ``weights`` (bin:
  a safetensors file of the residual's ``state_dict``), optional ``config`` (map of ``ResidualConfig`` fields;
  default: the served residual's config). Reply: ``{"residual_version": int}``.
- ``weights`` (v3) — none. Reply ``{"residual_version": int, "config": map of ``ResidualConfig`` fields or nil,
  "weights": bin (a safetensors file of the served residual's ``state_dict``, the layout a push sends) or nil}``
  (nil: no residual served). A robot keeps this copy to run base + residual itself while the learner is down.
- ``close`` — ``session``: forget a session's state. Reply ``{"closed": bool}``.
- ``ping`` — none. Reply ``{"time": float (server wall clock, s), "stats": map, "sessions": int}`` (+ ``learner``,
  the map of a ``transitions`` reply, when a learner is attached).
- ``transitions`` (v2) — K >= 1 executed control steps, actor -> learner, accepted only by a server with a learner
  attached (``robot-rl train-residual --actors``; else error ``not_learning``). Each row is self-contained, so the
  learner needs no per-session state beyond its n-step windows and rows of one session must arrive in step order:
  ``sessions`` (list of K session ids), ``steps`` (int64 (K,): control step of the row), ``obs`` ({key: float32
  (K, d)}: every low-dim key of the server's ``obs_spec`` at that step), ``base`` (float32 (K, A): the raw base
  action executed there), ``residual`` (float32 (K, A): the residual actually executed, residual units in [-1, 1],
  exploration noise included), ``executed`` (float32 (K, A): the raw executed action), ``reward`` (float32 (K,)),
  ``terminated``, ``truncated``, ``success`` (bool (K,)), ``next_obs`` ({key: float32 (K, d)}: the TRUE next
  observation, the final one for an ended episode), ``next_base`` (float32 (K, A): the raw base action at
  ``next_obs``, i.e. the next step's, or for an ended episode the one the base would have executed there),
  ``residual_version`` (int64 (K,): version of the residual that produced the row), ``new_chunk`` (bool (K,):
  the row's base action opened a new action chunk), optional ``intervention`` (bool (K,), default false: a human
  drove the step; ``executed`` is then the human's action). Reply ``{"accepted": int, "backlog": int
  (transitions received and not yet trained on), "explore": {"mode": "warmup" | "policy", "warmup_noise": float,
  "std": float}, "stop": bool (the learner has what it needs)}``.

Arrays are maps ``{"dtype": <name in DTYPES>, "shape": [int, ...], "data": <bin, C order, little endian>}``.
Errors are replies ``{"v": 1, "type": "error", "id": <id or nil>, "code": <ERROR_CODES>, "field": str,
"message": str}``; the server answers every request, malformed ones included, and never dies of one.
A change of any of this bumps :data:`PROTOCOL_VERSION`; a request with another ``v`` gets a ``version`` error.

v2 added ``transitions`` and the ``not_learning`` error code; v3 added ``weights``; clients of an older version get
a ``version`` error.

Weight versions and chunks: a session takes the newest pushed residual when its base plans a chunk (or at reset)
and keeps it for every step of that chunk, so no action chunk mixes two residual versions; ``act`` replies carry
the version that produced them.

Sessions and clients (server behaviour within v2; no field changed): the client chooses session ids, and a
session belongs to the *client* that opened it — the ZeroMQ routing identity of its connection (plus the token
when the server has one). Session ids are a per-client namespace: a request naming a session the sending client
did not open gets ``unknown_session`` and changes nothing (``reset=true`` opens the sender's own session of that
id), so ids need not be secret. A client keeps its sessions across reconnects by connecting with the same routing
identity (the server sets ``ROUTER_HANDOVER``); :class:`robot_rl.serve.client.PolicyClient` uses a random
17-byte identity per client object. Raw ZeroMQ peers that set no identity get one per connection. Limits
(``capacity`` errors, ``too_large`` pushes): see :class:`robot_rl.serve.server.ServeConfig` and docs/SECURITY.md.
"""

from __future__ import annotations

import math
import string

import msgpack
import numpy as np

PROTOCOL_VERSION = 3
DEFAULT_PORT = 5555
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # 16 MiB: e.g. 2 frames of two 480x640 RGB cameras with room to spare

#: dtype names allowed on the wire -> numpy little-endian dtype
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "uint8": "|u1", "int8": "|i1", "int16": "<i2",
          "int32": "<i4", "int64": "<i8", "uint16": "<u2", "bool": "|b1"}
MAX_NDIM = 6
MAX_SESSION_LEN = 128
MAX_ID = 2**63 - 1
REQUEST_TYPES = ("metadata", "act", "push_weights", "close", "ping", "transitions", "weights")
MAX_TRANSITIONS = 4096  # rows of one ``transitions`` request
ERROR_CODES = ("decode", "too_large", "version", "schema", "auth", "dtype", "shape", "value", "unknown_session",
               "stale_step", "capacity", "push_rejected", "internal", "not_learning")
_SESSION_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:/@+=")


class ProtocolError(Exception):
    """A request (or reply) that breaks the protocol. ``code`` is one of :data:`ERROR_CODES`, ``field`` names the
    offending field (dotted path), ``message`` says what is wrong and how to fix it."""

    def __init__(self, code: str, field: str, message: str):
        assert code in ERROR_CODES, code
        self.code, self.field, self.message = code, field, message
        super().__init__(f"{code}: {field}: {message}")


# --- bytes <-> message ------------------------------------------------------------------------------------------
def pack(msg: dict) -> bytes:
    """Message map -> msgpack bytes (str as text, bytes as bin). Values must be msgpack-native (no numpy)."""
    return msgpack.packb(msg, use_bin_type=True)


def _no_ext(code, data):
    raise ProtocolError("decode", "message", f"msgpack extension type {code} is not allowed")


def unpack(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict:
    """msgpack bytes -> message map. Raises ProtocolError ``too_large`` past ``max_bytes``, ``decode`` for anything
    that is not exactly one well-formed msgpack map with string keys (extension types, trailing bytes, too deep)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError("decode", "message", f"expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise ProtocolError("too_large", "message", f"{len(raw)} bytes > limit {max_bytes} bytes; send smaller "
                            "observations (fewer frames, smaller images) or raise the server's --max-message-mb")
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext,
                              timestamp=0)
    except ProtocolError:
        raise
    except Exception as e:  # FormatError, ExtraData, StackError, ValueError, UnicodeDecodeError, TypeError...
        raise ProtocolError("decode", "message", f"not a single msgpack message ({type(e).__name__}: {e})"[:300])
    if not isinstance(obj, dict):
        raise ProtocolError("decode", "message", f"expected a msgpack map, got {type(obj).__name__}")
    return obj


# --- arrays -----------------------------------------------------------------------------------------------------
def encode_array(a) -> dict:
    """numpy array (dtype in :data:`DTYPES`) -> ``{"dtype", "shape", "data"}`` (C order, little endian).
    Raises ProtocolError ``dtype`` for other dtypes."""
    a = np.asarray(a)
    name = a.dtype.name
    if name not in DTYPES:
        raise ProtocolError("dtype", "array", f"dtype {a.dtype} is not allowed; use one of {sorted(DTYPES)}")
    a = np.ascontiguousarray(a, dtype=np.dtype(DTYPES[name]))
    return {"dtype": name, "shape": list(a.shape), "data": a.tobytes()}


def decode_array(obj, field: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> np.ndarray:
    """``{"dtype", "shape", "data"}`` -> read-only numpy array (native byte order). Raises ProtocolError (``schema``,
    ``dtype``, ``shape``, ``too_large``) naming ``field``."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError("schema", field, "an array must be a map with exactly the keys dtype, shape, data")
    dt, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dt, str) or dt not in DTYPES:
        raise ProtocolError("dtype", field, f"dtype {dt!r} is not allowed; use one of {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 2**31 for s in shape)):
        raise ProtocolError("shape", field, f"shape must be a list of at most {MAX_NDIM} non-negative ints")
    if not isinstance(data, bytes):
        raise ProtocolError("schema", field + ".data", "must be binary (msgpack bin)")
    npdt = np.dtype(DTYPES[dt])
    n = math.prod(shape) * npdt.itemsize
    if n > max_bytes:
        raise ProtocolError("too_large", field, f"array of {n} bytes exceeds {max_bytes} bytes")
    if len(data) != n:
        raise ProtocolError("shape", field, f"{len(data)} data bytes do not match dtype {dt} x shape {shape} "
                                            f"= {n} bytes")
    a = np.frombuffer(data, dtype=npdt).reshape(shape)
    return a.astype(a.dtype.newbyteorder("="), copy=False) if not a.dtype.isnative else a


# --- field checks -----------------------------------------------------------------------------------------------
_REQ = object()


def _int(m: dict, name: str, lo: int = 0, hi: int = MAX_ID, default=_REQ, where: str = "") -> int:
    if name not in m:
        if default is _REQ:
            raise ProtocolError("schema", where + name, "missing (required int)")
        return default
    v = m[name]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError("schema", where + name, f"must be an int in [{lo}, {hi}], got {_show(v)}")
    return v


def _bool(m: dict, name: str, default=False) -> bool:
    v = m.get(name, default)
    if not isinstance(v, bool):
        raise ProtocolError("schema", name, f"must be a bool, got {_show(v)}")
    return v


def _str(m: dict, name: str, max_len: int, default=_REQ) -> str:
    if name not in m:
        if default is _REQ:
            raise ProtocolError("schema", name, "missing (required string)")
        return default
    v = m[name]
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError("schema", name, f"must be a string of at most {max_len} chars, got {_show(v)}")
    return v


def _show(v) -> str:
    s = repr(v) if isinstance(v, (int, float, bool, type(None))) else type(v).__name__
    return s[:60]


def _check_fields(m: dict, allowed: set, kind: str) -> None:
    extra = sorted(str(k) for k in set(m) - allowed)
    if extra:
        raise ProtocolError("schema", extra[0][:60], f"unknown field for a {kind!r} message "
                                                     f"(allowed: {sorted(allowed)})")


def check_session(s) -> str:
    if not isinstance(s, str) or not 1 <= len(s) <= MAX_SESSION_LEN or not set(s) <= _SESSION_CHARS:
        raise ProtocolError("schema", "session", f"must be 1..{MAX_SESSION_LEN} chars of letters, digits and "
                                                 "-_.:/@+=")
    return s


# --- requests ---------------------------------------------------------------------------------------------------
_COMMON = {"v", "type", "id", "token"}
_FIELDS = {"metadata": set(), "ping": set(), "weights": set(), "close": {"session"},
           "act": {"session", "step", "obs", "reset", "seed", "new_chunk"},
           "push_weights": {"version", "weights", "config"},
           "transitions": {"sessions", "steps", "obs", "base", "residual", "executed", "reward", "terminated",
                           "truncated", "success", "next_obs", "next_base", "residual_version", "new_chunk",
                           "intervention"}}
#: ``transitions`` arrays: name -> (dtype, trailing shape: "A" = the action dim, () = per row); all have K rows
TRANSITION_ARRAYS = {"steps": ("int64", ()), "base": ("float32", ("A",)), "residual": ("float32", ("A",)),
                     "executed": ("float32", ("A",)), "reward": ("float32", ()), "terminated": ("bool", ()),
                     "truncated": ("bool", ()), "success": ("bool", ()), "next_base": ("float32", ("A",)),
                     "residual_version": ("int64", ()), "new_chunk": ("bool", ()), "intervention": ("bool", ())}


def request_id(m) -> int | None:
    """The request's ``id`` if it is a valid one (so that even an error reply can echo it), else None."""
    if isinstance(m, dict):
        v = m.get("id")
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID:
            return v
    return None


def parse_request(m: dict, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict:
    """Check a decoded request map against the schema and return a clean dict
    ``{"type", "id", "token", ...type fields}`` with ``obs`` arrays decoded (numpy, not yet checked against the
    policy spec: see :func:`check_obs`). Raises ProtocolError naming the first bad field."""
    if not isinstance(m, dict):
        raise ProtocolError("decode", "message", "expected a msgpack map")
    v = m.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError("version", "v", f"protocol version {_show(v)} is not supported; this server speaks "
                                            f"v{PROTOCOL_VERSION} (upgrade the client)")
    t = m.get("type")
    if t not in REQUEST_TYPES:
        raise ProtocolError("schema", "type", f"{_show(t) if not isinstance(t, str) else t[:40]!r} is not a "
                                              f"request type; use one of {list(REQUEST_TYPES)}")
    _check_fields(m, _COMMON | _FIELDS[t], t)
    out = {"type": t, "id": _int(m, "id"), "token": _str(m, "token", 256, default=None)}
    if t in ("act", "close"):
        out["session"] = check_session(m.get("session"))
    if t == "act":
        out["step"] = _int(m, "step", 0, 2**53)
        out["reset"] = _bool(m, "reset")
        out["new_chunk"] = _bool(m, "new_chunk")
        out["seed"] = _int(m, "seed", 0, 2**63 - 1, default=None)
        if out["seed"] is not None and not out["reset"]:
            raise ProtocolError("schema", "seed", "only allowed together with reset=true")
        out["obs"] = _obs_map(m, "obs", max_bytes)
    elif t == "push_weights":
        out["version"] = _int(m, "version", 1)
        w = m.get("weights")
        if not isinstance(w, bytes) or not w:
            raise ProtocolError("schema", "weights", "must be non-empty binary (safetensors file bytes)")
        out["weights"] = w
        cfg = m.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise ProtocolError("schema", "config", "must be a map of ResidualConfig fields or absent")
        out["config"] = cfg
    elif t == "transitions":
        sess = m.get("sessions")
        if not isinstance(sess, list) or not 1 <= len(sess) <= MAX_TRANSITIONS:
            raise ProtocolError("schema", "sessions", f"must be a list of 1..{MAX_TRANSITIONS} session ids")
        out["sessions"] = [check_session(x) for x in sess]
        for name in ("obs", "next_obs"):
            out[name] = _obs_map(m, name, max_bytes)
        for name in TRANSITION_ARRAYS:
            if name in m:
                out[name] = decode_array(m[name], name, max_bytes)
            elif name != "intervention":
                raise ProtocolError("schema", name, "missing (required array)")
    return out


def _obs_map(m: dict, name: str, max_bytes: int) -> dict:
    obs = m.get(name)
    if not isinstance(obs, dict) or not obs or len(obs) > 64:
        raise ProtocolError("schema", name, "must be a map {key: array} with 1..64 keys")
    out = {}
    for k, a in obs.items():
        if not isinstance(k, str) or not k.isidentifier() or len(k) > 64:
            shown = repr(k[:64]) if isinstance(k, str) else _show(k)
            raise ProtocolError("schema", name, f"bad observation key {shown}; keys are identifiers")
        out[k] = decode_array(a, f"{name}.{k}", max_bytes)
    return out


def check_transitions(req: dict, spec: dict, action_dim: int) -> int:
    """Check a parsed ``transitions`` request against the server's low-dim ``obs_spec`` and action dim; returns K.
    Raises ProtocolError (``schema``, ``dtype``, ``shape``, ``value``) naming the field."""
    k = len(req["sessions"])
    low = {key: s for key, s in spec.items() if s["dtype"] == "float32"}
    for name in ("obs", "next_obs"):
        obs = req[name]
        missing, extra = sorted(set(low) - set(obs)), sorted(set(obs) - set(low))
        if missing or extra:
            raise ProtocolError("schema", f"{name}.{(missing or extra)[0]}",
                                f"{'missing' if missing else 'not a low-dim observation of this policy'}; send "
                                f"exactly {sorted(low)}")
        for key, s in low.items():
            _check_rows(obs[key], f"{name}.{key}", "float32", [k, *s["shape"]])
    for name, (dt, tail) in TRANSITION_ARRAYS.items():
        if name in req:
            _check_rows(req[name], name, dt, [k, *(action_dim for _ in tail)])
    return k


def _check_rows(a: np.ndarray, field: str, dtype: str, shape: list) -> None:
    if a.dtype.name != dtype:
        raise ProtocolError("dtype", field, f"dtype {a.dtype.name}, expected {dtype}")
    if list(a.shape) != shape:
        raise ProtocolError("shape", field, f"shape {list(a.shape)}, expected {shape} (K rows)")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ProtocolError("value", field, "contains NaN or inf")


def check_obs(obs: dict, spec: dict, max_frames: int) -> int:
    """Check decoded observation frames against the server's spec; returns the number of frames F.

    Args:
        obs: {key: array (F, *shape)}; spec: {key: {"dtype": str, "shape": [int, ...]}} (the metadata's
            ``obs_spec``); max_frames: n_obs_steps.
    Raises ProtocolError: ``schema`` for missing/unknown keys, ``dtype`` for a dtype other than the spec's,
    ``shape`` for a wrong shape or inconsistent F, ``value`` for non-finite floats.
    """
    missing, extra = sorted(set(spec) - set(obs)), sorted(set(obs) - set(spec))
    if missing:
        raise ProtocolError("schema", f"obs.{missing[0]}", f"missing; the server needs exactly {sorted(spec)}")
    if extra:
        raise ProtocolError("schema", f"obs.{extra[0]}", f"not an observation of this policy; send only "
                                                         f"{sorted(spec)}")
    frames = None
    for k, s in spec.items():
        a = obs[k]
        if a.dtype.name != s["dtype"]:
            raise ProtocolError("dtype", f"obs.{k}", f"dtype {a.dtype.name}, expected {s['dtype']}")
        if a.ndim != len(s["shape"]) + 1 or list(a.shape[1:]) != list(s["shape"]):
            want = ", ".join(map(str, s["shape"]))
            raise ProtocolError("shape", f"obs.{k}", f"shape {list(a.shape)}, expected [F, {want}] with "
                                                     f"1 <= F <= {max_frames} frames")
        f = a.shape[0]
        if not 1 <= f <= max_frames or (frames is not None and f != frames):
            raise ProtocolError("shape", f"obs.{k}", f"{f} frames; every key needs the same F in 1..{max_frames}")
        frames = f
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ProtocolError("value", f"obs.{k}", "contains NaN or inf")
    return frames


def request(type_: str, id_: int, token: str | None = None, **fields) -> dict:
    """Build a request map (numpy arrays, also inside ``obs`` / ``next_obs``, are encoded). Client side; no
    validation of values."""
    m = {"v": PROTOCOL_VERSION, "type": type_, "id": int(id_)}
    if token is not None:
        m["token"] = token
    for k, v in fields.items():
        if v is None:
            continue
        if k in ("obs", "next_obs"):
            m[k] = {kk: encode_array(vv) for kk, vv in v.items()}
        else:
            m[k] = encode_array(v) if isinstance(v, np.ndarray) else v
    return m


# --- replies ----------------------------------------------------------------------------------------------------
def error_reply(id_: int | None, code: str, field: str, message: str) -> dict:
    return {"v": PROTOCOL_VERSION, "type": "error", "id": id_, "code": code, "field": str(field)[:200],
            "message": str(message)[:1000]}


def reply(type_: str, id_: int | None, **fields) -> dict:
    return {"v": PROTOCOL_VERSION, "type": type_, "id": id_, **fields}


_REPLY_TYPES = set(REQUEST_TYPES) | {"error"}
_ACT_ARRAYS = ("base", "residual", "executed")


def parse_reply(m: dict, max_bytes: int = 2**31) -> dict:
    """Check a reply map (client side) and decode the act arrays in place. Raises ProtocolError on a malformed
    reply (a server speaking another version, or not a robot_rl server at all)."""
    if m.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("version", "v", f"server speaks protocol {_show(m.get('v'))}, this client "
                                            f"v{PROTOCOL_VERSION}")
    if m.get("type") not in _REPLY_TYPES:
        raise ProtocolError("schema", "type", f"unknown reply type {_show(m.get('type'))}")
    if m["type"] == "error":
        for k in ("code", "field", "message"):
            if not isinstance(m.get(k), str):
                raise ProtocolError("schema", k, "error reply without a string " + k)
    if m["type"] == "act":
        for k in _ACT_ARRAYS:
            m[k] = decode_array(m.get(k), k, max_bytes)
    return m
