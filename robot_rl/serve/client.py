"""Client side of the policy server (:mod:`robot_rl.serve.server`).

- :class:`PolicyClient` — synchronous calls with a deadline, retries and reconnect. A call that gets no reply
  within its deadline raises :class:`ServerTimeout` (a ``TimeoutError``); after each failed attempt the socket is
  closed and a fresh one connected, so a restarted server is picked up by the next attempt or call. Retries re-send
  the same request id: the server answers a repeated ``act`` id from its cache instead of stepping twice. When a
  restarted server no longer knows a session, :meth:`PolicyClient.act` re-creates it from the frames it sent last
  (``reset`` with the last ``n_obs_steps`` frames; the session's noise generator restarts from its seed).
- :class:`AsyncChunkClient` — asynchronous chunk execution for a control loop: returns one action per call,
  requests the next chunk in the background once fewer than ``threshold`` actions are queued, and blends
  overlapping chunks with temporal ensembling (ACT, Zhao et al. 2023: the action for step t is the weighted mean of
  every chunk's prediction for t, weight ``exp(-m * i)`` with i = 0 for the oldest prediction) — or, with
  ``ensemble_decay=None``, switches to the newest chunk. The history and the queue are a
  :class:`robot_rl.policies.execution.ChunkStream`, as in every other execution path.
- :class:`RemotePolicy` — the :class:`robot_rl.stages.evaluation.CombinedPolicy` interface (reset/observe/act on N envs)
  backed by a server, one session per env, one pipelined round of requests per step (``robot-rl eval --server``).

A client object is not thread-safe: use one per thread. ``token`` defaults to ``$ROBOT_RL_SERVER_TOKEN``.
Sessions belong to the client object that opened them: each :class:`PolicyClient` connects with its own random
ZeroMQ routing identity (kept across reconnects), and the server serves a session only to that identity (see
docs/SECURITY.md). Two client objects therefore never share a session, even with the same session id.
"""

from __future__ import annotations

import math
import operator
import os
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from robot_rl.errors import ConfigError
from robot_rl.policies.execution import ChunkStream, check_ensemble_decay
from robot_rl.serve import protocol as P


class ServerError(RuntimeError):
    """The server answered with an error reply: ``code`` (one of protocol.ERROR_CODES), ``field``, ``message``."""

    def __init__(self, code: str, field: str, message: str):
        self.code, self.field, self.message = code, field, message
        super().__init__(f"policy server error [{code}] {field}: {message}")


class ServerTimeout(TimeoutError):
    """No reply within the call's deadline (server down, unreachable or overloaded)."""


@dataclass
class ActResult:
    """One ``act`` reply. Arrays are float32 (n, A), row i for control step ``chunk_start + i`` (n >= 1):
    ``base`` raw base actions, ``residual`` the residual's mean output (normalized action space, before alpha),
    ``executed`` = unnormalize(clip(normalize(base) + alpha * residual, -1, 1)) (== base without a residual).
    ``timing``: server-side ms (queue_ms, base_ms, residual_ms, server_ms) and batch_size; ``rtt_ms``: client
    round trip."""

    session: str
    step: int
    chunk_start: int
    base: np.ndarray
    residual: np.ndarray
    executed: np.ndarray
    base_version: str
    residual_version: int
    new_chunk: bool
    timing: dict
    rtt_ms: float = 0.0
    recovered: bool = False

    @property
    def action(self) -> np.ndarray:
        """The executed action for ``step``, float32 (A,)."""
        return self.executed[0]


def normalize_address(address: str) -> str:
    """``host:port`` / ``tcp://host:port`` / ``[::1]:port`` -> ``tcp://host:port``. Raises ConfigError."""
    a = str(address).strip()
    if not a.startswith("tcp://"):
        if "://" in a:
            raise ConfigError("server", f"{address!r}: only tcp:// addresses are supported",
                              "use host:port, e.g. 127.0.0.1:5555")
        a = "tcp://" + a
    host, _, port = a[6:].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("server", f"{address!r} is not host:port", "use e.g. 127.0.0.1:5555")
    if host.startswith("["):
        ok = host.endswith("]") and ":" in host and all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    else:  # a host name or IPv4 address; IPv6 needs brackets, and '*' (bind-all) is not a place to connect to
        ok = all(c.isalnum() or c in "-._" for c in host)
    if not ok:
        raise ConfigError("server", f"{address!r}: {host!r} is not a host name or address",
                          "use e.g. 127.0.0.1:5555, robot-pc:5555 or [::1]:5555 (IPv6 in brackets)")
    return a


def _timeout(field: str, value) -> float:
    """A deadline in seconds: a finite number > 0. Raises ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(value) and value > 0):
        raise ConfigError(field, f"{value!r} is not a finite number of seconds > 0", "pass e.g. 2.0")
    return float(value)


def prepare_frames(meta: dict, obs: dict, frames: bool = False) -> dict[str, np.ndarray]:
    """Observation dict -> {key: (F, *shape)} arrays in the server's dtypes, checked against its spec.

    ``meta``: the server's metadata. ``obs``: one frame per key (the env's observation, spec shape) or, with
    ``frames=True``, (F, *shape) with F <= n_obs_steps. Only the spec's keys are sent (extra keys are ignored).
    Floats/ints are cast to the spec's float32; images must already be uint8. Raises ConfigError naming the key on
    a missing key, a wrong dtype or shape, or NaN/inf.
    """
    spec = meta["obs_spec"]
    if not isinstance(obs, Mapping):
        raise ConfigError("obs", f"expected a dict of arrays, got {type(obs).__name__}",
                          f"pass {{key: array}} for the keys {sorted(spec)}")
    out = {}
    for k, s in spec.items():
        if k not in obs:
            raise ConfigError(f"obs['{k}']", f"missing (the server needs {sorted(spec)})",
                              "pass every key of the server's obs_spec")
        try:
            a = np.asarray(obs[k])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"obs['{k}']", f"not an array ({str(e).splitlines()[0]})",
                              f"pass a numeric array of shape {s['shape']}") from None
        if s["dtype"] != a.dtype.name:
            if s["dtype"] == "float32" and a.dtype.kind in "fiu":
                a = a.astype(np.float32)
            else:
                raise ConfigError(f"obs['{k}']", f"dtype {a.dtype}, the server expects {s['dtype']}",
                                  f"convert it to {s['dtype']}")
        out[k] = a if frames else a[None]
    try:
        P.check_obs(out, spec, meta["n_obs_steps"])
    except P.ProtocolError as e:
        raise ConfigError(e.field, e.message, "send arrays matching the server's obs_spec (metadata())") from None
    return out


def _int(field: str, value) -> int:
    """An integer field of a request (numpy integers included). Raises ConfigError."""
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(field, f"{value!r} is not an integer", f"pass an int {field}") from None


def _session(value) -> str:
    """A session id as the protocol accepts it (checked before anything is sent). Raises ConfigError."""
    try:
        return P.check_session(value)
    except P.ProtocolError as e:
        raise ConfigError("session", f"{value!r} {e.message}", "use e.g. 'robot0' or f'env{i}'") from None


def _rows(frames: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """{key: (F, ...)} -> F frames {key: (...)}."""
    return [{k: v[i] for k, v in frames.items()} for i in range(next(iter(frames.values())).shape[0])]


class PolicyClient:
    """Synchronous client of one policy server.

    Args:
        address: ``host:port`` or ``tcp://host:port``.
        token: shared token (default ``$ROBOT_RL_SERVER_TOKEN``; None: no authentication).
        timeout_s: default deadline of one call (s), retries included.
        retries: re-sends within the deadline; each attempt gets ``timeout_s / (retries + 1)``.
        recover_sessions: transparently re-create sessions a restarted server lost (see module docstring).
        max_reply_bytes: replies larger than this are refused by ZeroMQ (protects the client).
    """

    def __init__(self, address: str = f"127.0.0.1:{P.DEFAULT_PORT}", *, token: str | None = None,
                 timeout_s: float = 2.0, retries: int = 2, recover_sessions: bool = True,
                 max_reply_bytes: int = 256 * 2**20, context=None):
        import zmq

        timeout_s = _timeout("timeout_s", timeout_s)
        if not (isinstance(retries, int) and retries >= 0):
            raise ConfigError("retries", f"{retries!r} is not a non-negative int", "e.g. 2")
        self.zmq = zmq
        self.address = normalize_address(address)
        self.token = token if token is not None else os.environ.get("ROBOT_RL_SERVER_TOKEN") or None
        self.timeout_s, self.retries, self.recover = float(timeout_s), retries, recover_sessions
        self.max_reply_bytes = max_reply_bytes
        self.ctx = context or zmq.Context.instance()
        self.sock = None
        self._next_id = random.SystemRandom().randrange(1, 2**62)
        # this client's ZeroMQ routing identity, kept across reconnects: the server binds sessions to it, so only
        # this object (not another peer, not a guess) can step them; random, so it cannot be guessed either
        self.identity = b"R" + secrets.token_bytes(16)
        self._meta: dict | None = None
        self._sent: dict[str, ChunkStream] = {}  # session -> the frames sent (history only), for recovery
        self._seeds: dict[str, int | None] = {}
        self.reconnects = 0

    # --- socket -------------------------------------------------------------------------------------------------
    def _connect(self):
        zmq = self.zmq
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        s.setsockopt(zmq.ROUTING_ID, self.identity)
        if self.address.startswith("tcp://["):
            s.setsockopt(zmq.IPV6, 1)
        s.connect(self.address)
        self.sock = s

    def _reset_socket(self):
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
            self.reconnects += 1

    def close(self) -> None:
        """Close the socket (pending requests are dropped)."""
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _new_id(self) -> int:
        self._next_id = self._next_id + 1 if self._next_id < P.MAX_ID else 1
        return self._next_id

    # --- calls --------------------------------------------------------------------------------------------------
    def _call_many(self, payloads: dict[int, bytes], timeout_s: float | None) -> dict[int, dict]:
        """Send every payload, collect the replies by id. Raises ServerTimeout when the deadline passes."""
        zmq = self.zmq
        timeout = self.timeout_s if timeout_s is None else _timeout("timeout_s", timeout_s)
        t_start = time.monotonic()
        deadline = t_start + timeout
        per_attempt = timeout / (self.retries + 1)
        outstanding, results = dict(payloads), {}
        for attempt in range(self.retries + 1):
            if self.sock is None:
                self._connect()
            try:
                for pl in outstanding.values():
                    self.sock.send(pl, zmq.NOBLOCK)
            except zmq.Again:  # send queue full (server gone for long): treat as a failed attempt
                pass
            end = deadline if attempt == self.retries else min(deadline, time.monotonic() + per_attempt)
            while outstanding:
                left = end - time.monotonic()
                if left <= 0 or not self.sock.poll(max(1, int(math.ceil(left * 1e3)))):
                    break
                raw = self.sock.recv(zmq.NOBLOCK)
                try:
                    m = P.parse_reply(P.unpack(raw, self.max_reply_bytes))
                except P.ProtocolError as e:
                    raise ServerError(e.code, e.field, f"malformed reply from {self.address}: {e.message}") from None
                rid = m.get("id")
                if rid in outstanding:
                    results[rid] = m
                    del outstanding[rid]
                elif m["type"] == "error" and rid is None:  # an error the server could not attribute to an id
                    raise ServerError(m["code"], m["field"], m["message"])
                # else: a late reply to an earlier, already answered or abandoned request: drop it
            if not outstanding:
                return results
            self._reset_socket()  # discard queued requests and stale replies; reconnect on the next attempt
            if time.monotonic() >= deadline:
                break
        raise ServerTimeout(f"no reply from the policy server at {self.address} within {timeout:.3f} s "
                            f"({self.retries + 1} attempt(s)); is it running? (robot-rl serve ...)")

    def _call(self, type_: str, timeout_s: float | None = None, **fields) -> dict:
        rid = self._new_id()
        m = self._call_many({rid: P.pack(P.request(type_, rid, self.token, **fields))}, timeout_s)[rid]
        if m["type"] == "error":
            raise ServerError(m["code"], m["field"], m["message"])
        return m

    def metadata(self, refresh: bool = False, timeout_s: float | None = None) -> dict:
        """The server's metadata (cached): obs_spec, action_spec, n_obs_steps, n_action_steps, horizon,
        control_rate_hz, normalization, base/residual versions, batching, limits. See PolicyService.metadata."""
        if self._meta is None or refresh:
            self._meta = self._call("metadata", timeout_s)
        return self._meta

    def ping(self, timeout_s: float | None = None) -> dict:
        """``{"time": server wall clock (s), "stats": {...}, "sessions": int}``."""
        return self._call("ping", timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        """Poll ``metadata`` until the server answers (or raise ServerTimeout after ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                return self.metadata(refresh=True, timeout_s=min(1.0, max(0.05, end - time.monotonic())))
            except ServerTimeout:
                if time.monotonic() >= end:
                    raise

    # --- observations -------------------------------------------------------------------------------------------
    def prepare_frames(self, obs: dict, frames: bool = False) -> dict[str, np.ndarray]:
        """:func:`prepare_frames` with this server's metadata."""
        return prepare_frames(self.metadata(), obs, frames)

    # --- act ----------------------------------------------------------------------------------------------------
    def act(self, session: str, step: int, obs: dict, *, reset: bool = False, seed: int | None = None,
            new_chunk: bool = False, frames: bool = False, timeout_s: float | None = None) -> ActResult:
        """Send the observation of control step ``step`` for ``session`` and get the action chunk from there.

        ``reset=True`` starts the session's episode (history filled with the first frame, new noise generator
        seeded with ``seed``; default seed ``crc32(session)``). ``new_chunk=True`` runs the base policy now even
        if the session has queued actions. Raises ConfigError (bad obs, checked locally), ServerError (error
        reply), ServerTimeout.
        """
        return self.act_many([dict(session=session, step=step, obs=obs, reset=reset, seed=seed,
                                   new_chunk=new_chunk, frames=frames)], timeout_s=timeout_s)[0]

    def act_many(self, items: list[dict], timeout_s: float | None = None) -> list[ActResult]:
        """Pipelined :meth:`act` for several sessions (dicts with the keys of :meth:`act`): all requests are sent
        before any reply is awaited, so the server can batch them. Results in the same order."""
        meta = self.metadata(timeout_s=timeout_s)
        to = meta["n_obs_steps"]
        reqs = []
        for it in items:
            fr = self.prepare_frames(it["obs"], it.get("frames", False))
            rid = self._new_id()
            step, seed = _int("step", it["step"]), it.get("seed")
            seed = _int("seed", seed) if seed is not None else None
            body = dict(session=_session(it["session"]), step=step, obs=fr, reset=bool(it.get("reset", False)),
                        seed=seed if it.get("reset") else None,
                        new_chunk=bool(it.get("new_chunk", False)) or None)
            reqs.append((rid, body, fr))
        t0 = time.perf_counter()
        replies = self._call_many({rid: P.pack(P.request("act", rid, self.token, **b)) for rid, b, _ in reqs},
                                  timeout_s)
        out = []
        for rid, body, fr in reqs:
            m = replies[rid]
            recovered = False
            sid = body["session"]
            if (m["type"] == "error" and m["code"] == "unknown_session" and self.recover and sid in self._sent
                    and not body["reset"]):
                hist = [*self._sent[sid].hist, *_rows(fr)][-to:]  # the last n_obs_steps frames, these included
                stacked = {k: np.stack([f[k] for f in hist]) for k in fr}
                rid2 = self._new_id()
                b2 = dict(body, obs=stacked, reset=True, seed=self._seeds.get(sid), new_chunk=None)
                m = self._call_many({rid2: P.pack(P.request("act", rid2, self.token, **b2))}, timeout_s)[rid2]
                body, fr, recovered = b2, stacked, True
            if m["type"] == "error":
                raise ServerError(m["code"], m["field"], m["message"])
            self._remember(sid, body, fr, to)
            out.append(ActResult(session=m["session"], step=m["step"], chunk_start=m["chunk_start"],
                                 base=m["base"], residual=m["residual"], executed=m["executed"],
                                 base_version=m["base_version"], residual_version=m["residual_version"],
                                 new_chunk=m["new_chunk"], timing=m["timing"],
                                 rtt_ms=(time.perf_counter() - t0) * 1e3, recovered=recovered))
        return out

    def _remember(self, sid, body, fr, to):
        if body["reset"] or sid not in self._sent:
            self._sent[sid] = ChunkStream(to)
            self._sent[sid].reset(_rows(fr), body["step"])
            self._seeds[sid] = body.get("seed")
        else:
            for f in _rows(fr):
                self._sent[sid].observe(f)

    # --- other requests -----------------------------------------------------------------------------------------
    def close_session(self, session: str, timeout_s: float | None = None) -> bool:
        """Free a session on the server; True if it existed."""
        self._sent.pop(session, None)
        self._seeds.pop(session, None)
        return bool(self._call("close", timeout_s, session=session)["closed"])

    def push_weights(self, weights, version: int, config: dict | None = None,
                     timeout_s: float | None = None) -> int:
        """Push new residual weights; returns the served residual version (== ``version``).

        ``weights``: a ResidualPolicy (its config is sent too unless ``config`` is given), a {name: tensor}
        state dict, or the bytes of a safetensors file. ``version`` must exceed the served version. Raises
        ServerError ``push_rejected`` (stale version, weights not matching the config, config not matching the
        base, push disabled) and ServerTimeout.
        """
        from safetensors.torch import save as st_save

        if hasattr(weights, "state_dict"):
            if config is None and hasattr(weights, "config"):
                from robot_rl.rl.residual import residual_config_dict

                config = residual_config_dict(weights)
            weights = weights.state_dict()
        if isinstance(weights, dict):
            weights = st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        if not isinstance(weights, (bytes, bytearray)):
            raise ConfigError("weights", f"{type(weights).__name__} is not a module, state dict or bytes",
                              "pass the residual policy, its state_dict() or safetensors bytes")
        m = self._call("push_weights", timeout_s, version=int(version), weights=bytes(weights), config=config)
        return int(m["residual_version"])

    def fetch_residual(self, base, timeout_s: float | None = None):
        """The served residual as a local frozen copy (the ``weights`` request): ``(residual_version,
        ResidualPolicy or None when the server serves none)``, checked against ``base`` (the same base policy as the
        server's). Raises ServerTimeout, ServerError, and ConfigError for weights that do not fit ``base``."""
        from safetensors.torch import load as st_load

        from robot_rl.rl.residual import residual_from_tensors

        m = self._call("weights", timeout_s)
        if m["weights"] is None:
            return int(m["residual_version"]), None
        return int(m["residual_version"]), residual_from_tensors(m["config"], st_load(m["weights"]), base)

    def send_transitions(self, rows: dict, timeout_s: float | None = None) -> dict:
        """Stream executed control steps to the learner behind the server (the ``transitions`` request of
        :mod:`robot_rl.serve.protocol`, whose doc lists the fields): ``rows`` maps ``sessions`` to a list of K
        session ids and every other field to numpy arrays of K rows (``obs`` / ``next_obs``: {key: (K, d)}). A
        retried request carries the same id and is counted once. Returns {accepted, backlog, explore, stop}.
        Raises ServerError (``not_learning``: no learner behind this server; ``schema`` / ``shape`` / ``dtype`` /
        ``value``: a bad row) and ServerTimeout."""
        m = self._call("transitions", timeout_s, **rows)
        return {k: m[k] for k in ("accepted", "backlog", "explore", "stop")}


class AsyncChunkClient:
    """Asynchronous chunk execution for one control loop (one server session).

    Call :meth:`act` once per control step with the newest observation (``reset=True`` on the first step of an
    episode); it returns the action to execute, float32 (A,). The first call of an episode blocks for a chunk.
    Afterwards, once at most ``threshold`` actions remain for the coming steps, the next chunk is requested in a
    background thread (``new_chunk`` at the current step, carrying the frames since the previous request), and the
    loop keeps executing queued actions meanwhile. A chunk computed for step s and received at step t > s is used
    from step t on (its rows for steps < t are stale and dropped). Overlapping predictions are blended by temporal
    ensembling with decay ``ensemble_decay`` (m; ACT uses 0.01); ``None`` switches to the newest chunk instead.
    The frames and the queue are a :class:`robot_rl.policies.execution.ChunkStream` (``stream``; its step clock
    ``stream.t`` is the current step), the blending its :class:`~robot_rl.policies.execution.ActionQueue`.
    Residual rows beyond the request step use the observation at the request step (zero-order hold, see
    :mod:`robot_rl.serve.server`). Raises ServerTimeout when no action for the current step arrives within
    ``timeout_s``, ServerError on an error reply, ConfigError for a bad ``threshold`` / ``ensemble_decay``.
    """

    def __init__(self, address: str, session: str, *, token: str | None = None, threshold: int = 2,
                 ensemble_decay: float | None = 0.01, timeout_s: float = 2.0, retries: int = 2):
        check_ensemble_decay(ensemble_decay)  # before connecting
        self.session, self.decay, self.timeout_s = session, ensemble_decay, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robot_rl-chunk-client")
        self._client = None
        kw = dict(token=token, timeout_s=timeout_s, retries=retries)

        def make():
            self._client = PolicyClient(address, **kw)
            return self._client.metadata()

        self.meta = self._pool.submit(make).result()
        self.To, self.Ta = self.meta["n_obs_steps"], self.meta["n_action_steps"]
        if not (isinstance(threshold, int) and 0 <= threshold < self.Ta):
            raise ConfigError("threshold", f"{threshold!r} not in 0..n_action_steps-1 = {self.Ta - 1}",
                              "request the next chunk when e.g. 2 actions are left")
        self.threshold = threshold
        self.stream = ChunkStream(self.To, ensemble_decay)
        self._inflight = None
        self.last_result: ActResult | None = None
        self.requests = 0

    @property
    def t(self) -> int:
        """The current control step of the episode (-1 before the first ``act(..., reset=True)``)."""
        return self.stream.t

    def _submit(self, reset: bool, seed: int | None):
        frames = self.stream.new_frames()
        step = self.stream.t
        self.requests += 1
        self._inflight = self._pool.submit(
            lambda: self._client.act(self.session, step, frames, reset=reset, seed=seed, new_chunk=True,
                                     frames=True))

    def _integrate(self, r: ActResult):
        self.last_result = r
        self.stream.queue.add(r.executed, r.chunk_start, now=self.stream.t)

    def act(self, obs: dict, reset: bool = False, seed: int | None = None,
            timeout_s: float | None = None) -> np.ndarray:
        """Observation of the current step (one frame per key) -> action float32 (A,). ``timeout_s``: this
        call's deadline (default: the constructor's)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not reset and self.stream.t < 0:
            raise ConfigError("reset", "the first act() of an episode needs reset=True", "pass reset=True")
        frame = {k: v[0] for k, v in prepare_frames(self.meta, obs).items()}  # here: the worker may be busy
        if reset:
            if self._inflight is not None:
                try:
                    self._inflight.result(timeout=timeout_s)
                except Exception:
                    pass
            self._inflight = None
            self.stream.reset([frame])
        else:
            self.stream.t += 1
            self.stream.observe(frame)
        if self._inflight is not None and self._inflight.done():
            r, self._inflight = self._inflight.result(), None
            self._integrate(r)
        if reset:
            self._submit(True, seed)
        elif self._inflight is None and self.stream.needs_chunk(self.threshold):
            self._submit(False, None)
        end = time.monotonic() + timeout_s
        while not self.stream.queue.covers(self.stream.t):
            if self._inflight is None:
                self._submit(False, None)
            try:
                r = self._inflight.result(timeout=max(0.0, end - time.monotonic()))
            except FutureTimeout:
                raise ServerTimeout(f"no action for step {self.stream.t} within {timeout_s} s") from None
            except BaseException:
                self._inflight = None
                raise
            self._inflight = None
            self._integrate(r)
        return self.stream.action()

    def close(self) -> None:
        def _close():
            if self._client is not None:
                self._client.close()

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)


@dataclass
class RemotePolicy:
    """:class:`robot_rl.stages.evaluation.CombinedPolicy`'s interface on a server: ``reset(mask, obs)``,
    ``observe(obs, mask)``, ``act(obs) -> (N, A)`` for N envs, one session per env and one pipelined round of
    ``act`` requests per step (the server batches the sessions that need a new chunk). Env i's sessions are seeded
    ``seed + i`` at every reset (its k-th episode: ``seed + i + 1_000_003 * k``)."""

    client: PolicyClient
    n_envs: int
    seed: int = 0
    prefix: str = field(default_factory=lambda: f"eval-{os.getpid()}-{secrets.token_hex(8)}")

    def __post_init__(self):
        self.has_residual = bool(self.client.metadata()["residual"]["loaded"])
        self.steps = [0] * self.n_envs
        self.need_reset = [True] * self.n_envs
        self.episodes = [0] * self.n_envs
        self.last: list[ActResult] = []

    def reset(self, mask, obs) -> None:
        for i in np.flatnonzero(mask):
            self.steps[i], self.need_reset[i] = 0, True

    def observe(self, obs, mask=None) -> None:
        for i in range(self.n_envs) if mask is None else np.flatnonzero(mask):
            self.steps[i] += 1

    def act(self, obs) -> np.ndarray:
        items = []
        for i in range(self.n_envs):
            it = dict(session=f"{self.prefix}-{i}", step=self.steps[i], obs={k: v[i] for k, v in obs.items()})
            if self.need_reset[i]:
                it.update(reset=True, seed=self.seed + i + 1_000_003 * self.episodes[i])
                self.episodes[i] += 1
                self.need_reset[i] = False
            items.append(it)
        self.last = self.client.act_many(items)
        return np.stack([r.action for r in self.last]).astype(np.float32)

    def close(self) -> None:
        for i in range(self.n_envs):
            try:
                self.client.close_session(f"{self.prefix}-{i}", timeout_s=0.5)
            except (ServerTimeout, ServerError):
                pass
