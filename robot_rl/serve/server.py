"""Policy server: a frozen base policy (+ optional residual) served over ZeroMQ with the msgpack protocol of
:mod:`robot_rl.serve.protocol`.

Two layers:

- :class:`PolicyService` — all the logic, no sockets: request checking, authentication, per-session state
  (observation history of ``n_obs_steps`` frames, the current base chunk, the noise generator, the last reply for
  idempotent retries), one batched base-policy call for every session that needs a new chunk, the residual applied
  per request, weight push. :meth:`PolicyService.process` runs raw request bytes to raw reply bytes synchronously
  (tests and the fuzzer use it); the socket loop uses :meth:`handle` + :meth:`run_batch`.
- :class:`PolicyServer` — one ROUTER socket and one thread: receives, answers what needs no base call at once,
  collects ``act`` requests that need a base call into a batch (closed after ``batch_window_ms``, at ``max_batch``
  requests, or as soon as every recently active session is waiting), runs it, replies. Weight pushes are applied
  between batches, so no request is dropped and none sees half-loaded weights.

Determinism ("the server equals in-process inference"): every session is a
:class:`robot_rl.policies.execution.ChunkStream` (observation history, chunk queue) with its own ``torch.Generator``
seeded at reset (``seed`` of the request, default ``zlib.crc32(session id)``); each batched base call
(:func:`robot_rl.policies.execution.predict_chunks`) draws every session's initial noise (1, T, A) from its own
generator and passes the stacked noise as ``init_noise``. This is exactly the draw
:class:`robot_rl.policies.execution.ChunkExecutor` makes for one env with ``torch.Generator().manual_seed(seed)``, so a
session reproduces ``CombinedPolicy(base, residual, n_envs=1, seed=seed)`` step for step, and batch composition never
changes a session's noise. Row 0 of every reply (the action for ``step``) gets its own residual call on a batch of
one (:func:`robot_rl.rl.residual.apply_residual`), as in-process per-step execution does, so it is
bit-identical.

Reply rows: ``base[i]``, ``residual[i]``, ``executed[i]`` are for step ``step + i`` (the remaining actions of the
session's current chunk, 1..n_action_steps rows). The residual of rows i >= 1 is evaluated on the newest
observation (zero-order hold): a client that executes those rows without asking again (async chunk execution) gets
the residual's correction for the observation it last sent; a client that asks every step gets exact per-step
ResiP execution from row 0.

Run it with ``robot-rl serve --checkpoint BASE [--residual RES]`` (or ``python -m robot_rl.cli serve ...``), or
inside another process with :class:`EmbeddedServer` (the policy node's in-process ``execution: async``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

import robot_rl
from robot_rl.errors import ConfigError
from robot_rl.policies.execution import ChunkStream, predict_chunks
from robot_rl.rl.residual import apply_residual, check_compatible, residual_config_dict
from robot_rl.serve import protocol as P


@dataclass
class ServeConfig:
    """Server parameters.

    host/port: address to bind (``127.0.0.1`` by default: loopback only; port 0 picks a free port).
    max_batch: most sessions in one base-policy call; batch_window_ms: longest wait (ms) for more requests once one
    needs a base call (the batch closes at once when every session active in the last second is waiting, so a
    lone client never waits; 10 ms lets 16 lockstep Python clients on 2 cores fill one batch).
    max_message_bytes: larger requests get a ``too_large`` error reply; anything beyond ``4 x max_message_bytes``
    is cut by ZeroMQ itself (the peer is disconnected) before it is read into memory.
    token: shared secret every request must carry (None: no authentication). control_rate_hz: the rate the policy
    was trained for (reported to clients). max_sessions / session_ttl_s: session table size and idle expiry (s).
    allow_push: accept ``push_weights``. seed: added to every session's default seed.
    """

    host: str = "127.0.0.1"
    port: int = P.DEFAULT_PORT
    max_batch: int = 16
    batch_window_ms: float = 10.0
    max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None
    control_rate_hz: float = 10.0
    max_sessions: int = 1024
    session_ttl_s: float = 3600.0
    allow_push: bool = True
    seed: int = 0

    def validate(self) -> "ServeConfig":
        def need(ok, fld, problem, fix):
            if not ok:
                raise ConfigError(fld, problem, fix)

        need(isinstance(self.port, int) and 0 <= self.port <= 65535, "port", f"{self.port!r} is not in 0..65535",
             "pass a TCP port (0 = any free port)")
        need(isinstance(self.max_batch, int) and self.max_batch >= 1, "max_batch", f"{self.max_batch!r} < 1",
             "use a positive batch size, e.g. 16")
        need(0 <= self.batch_window_ms <= 1000, "batch_window_ms", f"{self.batch_window_ms!r} not in [0, 1000]",
             "use a few milliseconds, e.g. 2")
        need(1024 <= self.max_message_bytes <= 2**30, "max_message_bytes",
             f"{self.max_message_bytes!r} not in [1 KiB, 1 GiB]", "e.g. 16 MiB")
        need(self.token is None or (isinstance(self.token, str) and 8 <= len(self.token) <= 256), "token",
             "must be 8..256 characters", "use a long random string (e.g. `python -c 'import secrets; "
             "print(secrets.token_urlsafe(32))'`)")
        need(self.control_rate_hz > 0, "control_rate_hz", f"{self.control_rate_hz!r} <= 0", "e.g. 10")
        need(self.max_sessions >= 1, "max_sessions", f"{self.max_sessions!r} < 1", "e.g. 1024")
        need(self.session_ttl_s > 0, "session_ttl_s", f"{self.session_ttl_s!r} <= 0", "e.g. 3600")
        return self


def weights_digest(module: torch.nn.Module) -> str:
    """First 12 hex digits of a SHA-256 over the module's state_dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


class _Session:
    """A client's episode: its :class:`ChunkStream` (history, chunk queue, own generator) and the retry state."""

    __slots__ = ("sid", "stream", "last_step", "last_id", "last_reply", "last_seen", "pending")

    def __init__(self, sid: str, n_obs: int, seed: int):
        self.sid = sid
        self.stream = ChunkStream(n_obs, seed=seed)
        self.last_step, self.last_id, self.last_reply = -1, None, None
        self.last_seen, self.pending = time.monotonic(), False


@dataclass
class Pending:
    """An ``act`` request that waits for the next batched base call."""

    req: dict
    session: _Session
    t_recv: float
    envelope: list = field(default_factory=list)


class PolicyService:
    """Base (+ residual) behind the protocol; owns the sessions. Not thread-safe: one thread drives it.

    Args:
        base: a frozen :class:`~robot_rl.policies.base.BasePolicy`.
        residual: a frozen :class:`~robot_rl.rl.residual.ResidualPolicy` matching the base, or None.
        config: :class:`ServeConfig`.
    Raises ConfigError when the residual does not match the base (action dim, obs keys).
    """

    def __init__(self, base, residual=None, config: ServeConfig | None = None):
        self.cfg = (config or ServeConfig()).validate()
        self.base = base.freeze() if hasattr(base, "freeze") else base
        bc = base.config
        self.To, self.Ta, self.T, self.A = bc.n_obs_steps, bc.n_action_steps, bc.horizon, bc.action_dim
        self.spec = {k: {"dtype": "float32", "shape": [int(bc.obs_dims[k])]} for k in bc.obs_keys}
        self.spec.update({k: {"dtype": "uint8", "shape": list(bc.image_shape)} for k in bc.image_keys})
        self.base_keys = list(bc.obs_keys) + list(bc.image_keys)
        if residual is not None:
            self._check_residual(residual, extend_spec=True)
        self.residual = residual
        self.residual_version = 0
        self.residual_digest = weights_digest(residual) if residual is not None else None
        self._last_push_sha = None
        self.base_version = weights_digest(base)
        self.sessions: dict[str, _Session] = {}
        self.stats = {"requests": 0, "errors": 0, "batches": 0, "batched_requests": 0, "pushes": 0}
        self._last_sweep = time.monotonic()

    # --- residual compatibility ---------------------------------------------------------------------------------
    def _check_residual(self, res, extend_spec: bool = False) -> None:
        check_compatible(res.config, self.base.config)
        for k in getattr(res.config, "fine_keys", None) or {}:
            d = int(res.config.obs_dims[k])
            if k in self.spec:
                if self.spec[k] != {"dtype": "float32", "shape": [d]}:
                    raise ConfigError(f"residual.fine_keys.{k}", f"dimension {d} conflicts with the served "
                                                                  f"observation spec {self.spec[k]}",
                                      "use a residual trained with this observation")
            elif extend_spec:
                self.spec[k] = {"dtype": "float32", "shape": [d]}
            else:
                raise ConfigError(f"residual.fine_keys.{k}", "not an observation this server was started with",
                                  "restart the server with a residual that uses this key")

    # --- metadata -----------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """The ``metadata`` reply body (without v/type/id)."""
        bc, norm = self.base.config, self.base.normalizer
        normalization = {k: {"min": getattr(norm, f"{k}_min").tolist(), "max": getattr(norm, f"{k}_max").tolist()}
                         for k in norm.dims}
        res = self.residual
        return {
            "protocol": P.PROTOCOL_VERSION, "server": f"robot_rl {robot_rl.__version__}",
            "obs_spec": self.spec,
            "action_spec": {"dtype": "float32", "shape": [self.A], "low": normalization["action"]["min"],
                            "high": normalization["action"]["max"],
                            "units": "raw env action (robot_rl.envs.env: EE delta x/y/z, yaw, gripper), [-1, 1]"},
            "n_obs_steps": self.To, "n_action_steps": self.Ta, "horizon": self.T,
            "control_rate_hz": float(self.cfg.control_rate_hz), "normalization": normalization,
            "base": {"kind": bc.kind, "version": self.base_version, "stochastic": bc.kind == "diffusion"},
            "residual": {"loaded": res is not None, "version": self.residual_version,
                         "digest": self.residual_digest,
                         "alpha": float(res.config.alpha) if res is not None else None,
                         "config": residual_config_dict(res) if res is not None else None},
            "batching": {"max_batch": self.cfg.max_batch, "window_ms": float(self.cfg.batch_window_ms)},
            "max_message_bytes": self.cfg.max_message_bytes, "auth_required": self.cfg.token is not None,
            "weight_push": bool(self.cfg.allow_push),
        }

    # --- request entry points -----------------------------------------------------------------------------------
    def handle(self, raw, t_recv: float | None = None) -> tuple[bytes | None, Pending | None]:
        """One raw request -> (reply bytes, None) when it can be answered now, or (None, Pending) for an ``act``
        that needs a base call (run it with :meth:`run_batch`), or (None, None) with the session busy (the caller
        must re-submit it after the current batch: see :meth:`process`). Never raises."""
        t_recv = time.perf_counter() if t_recv is None else t_recv
        self.stats["requests"] += 1
        rid = None
        try:
            m = P.unpack(raw, self.cfg.max_message_bytes)
            rid = P.request_id(m)
            if self.cfg.token is not None:
                tok = m.get("token")
                if not isinstance(tok, str) or not hmac.compare_digest(tok.encode(), self.cfg.token.encode()):
                    raise P.ProtocolError("auth", "token", "missing or wrong token; pass the server's shared token")
            req = P.parse_request(m, self.cfg.max_message_bytes)
            t = req["type"]
            if t == "act":
                return self._act(req, t_recv)
            if t == "metadata":
                return self._pack(P.reply("metadata", rid, **self.metadata())), None
            if t == "ping":
                return self._pack(P.reply("ping", rid, time=time.time(), stats=dict(self.stats),
                                          sessions=len(self.sessions))), None
            if t == "close":
                return self._pack(P.reply("close", rid, closed=self.sessions.pop(req["session"], None)
                                          is not None)), None
            if t == "push_weights":
                return self._push(req), None
            raise P.ProtocolError("schema", "type", "unhandled request type")  # unreachable: parse checked it
        except P.ProtocolError as e:
            return self._error(rid, e.code, e.field, e.message), None
        except ConfigError as e:
            return self._error(rid, "value", e.field, f"{e.problem} -> {e.fix}"), None
        except Exception as e:  # a bug must not take the server down: answer and carry on
            return self._error(rid, "internal", "server", f"{type(e).__name__}: {e}"[:500]), None

    def process(self, raws: list) -> list[bytes]:
        """Synchronously answer a list of raw requests (same order), batching all base calls they need."""
        replies: list = [None] * len(raws)
        todo = list(range(len(raws)))
        while todo:
            pend, later = [], []
            for i in todo:
                r, p = self.handle(raws[i])
                if r is not None:
                    replies[i] = r
                elif p is not None:
                    p.envelope = [i]
                    pend.append(p)
                else:
                    later.append(i)
            for k in range(0, len(pend), self.cfg.max_batch):
                chunk = pend[k:k + self.cfg.max_batch]
                for p, r in zip(chunk, self.run_batch(chunk)):
                    replies[p.envelope[0]] = r
            if later and not pend:  # cannot happen (busy implies a pending request); guard against a livelock
                for i in later:
                    replies[i] = self._error(None, "internal", "session", "session busy")
                later = []
            todo = later
        return replies

    # --- act ----------------------------------------------------------------------------------------------------
    def _act(self, req: dict, t_recv: float):
        rid, sid, step = req["id"], req["session"], req["step"]
        frames = P.check_obs(req["obs"], self.spec, self.To)
        s = self.sessions.get(sid)
        if s is not None and s.pending:
            return None, None  # one request per session at a time: the caller retries it after the batch
        if s is not None and s.last_id == rid and s.last_reply is not None:  # a client retry: same answer again
            s.last_seen = time.monotonic()
            return self._pack({**s.last_reply, "id": rid}), None
        obs = req["obs"]
        fr = [{k: np.array(obs[k][i]) for k in self.spec} for i in range(frames)]  # own, writable copies
        if req["reset"]:
            if s is None and len(self.sessions) >= self.cfg.max_sessions:
                self._sweep(force=True)
                if len(self.sessions) >= self.cfg.max_sessions:
                    raise P.ProtocolError("capacity", "session", f"{len(self.sessions)} sessions open (limit "
                                                                 f"{self.cfg.max_sessions}); close unused sessions")
            seed = req["seed"] if req["seed"] is not None else (zlib.crc32(sid.encode()) + self.cfg.seed) % 2**63
            s = _Session(sid, self.To, seed)
            self.sessions[sid] = s
            s.stream.reset(fr, step)
        else:
            if s is None:
                raise P.ProtocolError("unknown_session", "session", f"no session {sid!r} on this server (new or "
                                                                    "restarted server); send reset=true with the "
                                                                    "last n_obs_steps frames")
            if step <= s.last_step:
                raise P.ProtocolError("stale_step", "step", f"step {step} <= last step {s.last_step} of this "
                                                            "session; steps must increase (or send reset=true)")
            for f in fr:
                s.stream.observe(f)
            s.stream.t = step
        s.last_seen = time.monotonic()
        s.last_step = step  # the step is consumed even if the base call fails later
        if req["reset"] or req["new_chunk"] or not s.stream.queue.covers(step):
            s.pending = True
            return None, Pending(req, s, t_recv)
        return self._act_reply(req, s, t_recv, None, 0.0, 0), None

    def run_batch(self, pend: list[Pending]) -> list[bytes]:
        """One batched base call for the pending ``act`` requests (<= max_batch, distinct sessions) -> replies in
        the same order. Never raises: a failing call answers every request of the batch with an ``internal`` error.
        """
        t0 = time.perf_counter()
        sess = [p.session for p in pend]
        try:
            chunks = predict_chunks(self.base, [s.stream for s in sess], self.base_keys)
            base_ms = (time.perf_counter() - t0) * 1e3
            self.stats["batches"] += 1
            self.stats["batched_requests"] += len(pend)
            out = []
            for j, p in enumerate(pend):
                p.session.stream.queue.add(chunks[j], p.req["step"])
                out.append(self._act_reply(p.req, p.session, p.t_recv, t0, base_ms, len(pend)))
            return out
        except Exception as e:
            for s in sess:
                s.stream.queue.clear()
                s.last_reply = None
            msg = f"{type(e).__name__}: {e}"[:500]
            return [self._error(p.req["id"], "internal", "base", msg) for p in pend]
        finally:
            for s in sess:
                s.pending = False

    def _act_reply(self, req, s: _Session, t_recv, t_batch, base_ms, batch_size) -> bytes:
        t0 = time.perf_counter()
        step = req["step"]
        rows = s.stream.queue.rows(step)
        n = rows.shape[0]
        if self.residual is None:
            r, executed = apply_residual(self.base.normalizer, None, {}, rows)
        else:  # the newest observation's low-dim keys (the residual reads low-dim keys only)
            obs1 = {k: v[None] for k, v in s.stream.latest.items() if self.spec[k]["dtype"] == "float32"}
            parts = []
            # row 0 alone (a batch of one, like per-step in-process execution: bit-identical); rows 1.. together
            for a, b in ((0, 1), (1, n)):
                if b > a:
                    ob = obs1 if b - a == 1 else {k: np.repeat(v, b - a, axis=0) for k, v in obs1.items()}
                    parts.append(apply_residual(self.base.normalizer, self.residual, ob, rows[a:b]))
            r = np.concatenate([p[0] for p in parts])
            executed = np.concatenate([p[1] for p in parts])
        now = time.perf_counter()
        body = P.reply("act", req["id"], session=s.sid, step=step, chunk_start=step,
                       base=P.encode_array(rows), residual=P.encode_array(r), executed=P.encode_array(executed),
                       base_version=self.base_version, residual_version=self.residual_version,
                       new_chunk=t_batch is not None,
                       timing={"queue_ms": ((t_batch - t_recv) * 1e3) if t_batch is not None else 0.0,
                               "base_ms": base_ms, "residual_ms": (now - t0) * 1e3, "batch_size": batch_size,
                               "server_ms": (now - t_recv) * 1e3})
        s.last_id, s.last_reply = req["id"], body
        return self._pack(body)

    # --- weight push --------------------------------------------------------------------------------------------
    def _push(self, req: dict) -> bytes:
        from safetensors.torch import load as st_load

        from robot_rl.rl.residual import residual_from_tensors

        rid, version = req["id"], req["version"]
        if not self.cfg.allow_push:
            raise P.ProtocolError("push_rejected", "push_weights", "weight push is disabled on this server "
                                                                   "(started with --no-weight-push)")
        sha = hashlib.sha256(req["weights"]).hexdigest()
        if version == self.residual_version and sha == self._last_push_sha:  # a retry of the push just applied
            return self._pack(P.reply("push_weights", rid, residual_version=version))
        if version <= self.residual_version:
            raise P.ProtocolError("push_rejected", "version", f"{version} <= served residual version "
                                                              f"{self.residual_version}; versions must increase")
        cfg = req["config"]
        if cfg is None:
            if self.residual is None:
                raise P.ProtocolError("push_rejected", "config", "this server has no residual yet; send the "
                                                                 "residual's config with the first push")
            cfg = residual_config_dict(self.residual)
        try:
            tensors = st_load(req["weights"])
        except Exception as e:
            raise P.ProtocolError("push_rejected", "weights", f"not a safetensors file ({type(e).__name__}: "
                                                              f"{e})"[:300]) from None
        try:
            new = residual_from_tensors(cfg, tensors, self.base)
            self._check_residual(new)
        except ConfigError as e:
            raise P.ProtocolError("push_rejected", e.field, f"{e.problem} -> {e.fix}") from None
        self.residual, self.residual_version = new, version
        self.residual_digest, self._last_push_sha = weights_digest(new), sha
        self.stats["pushes"] += 1
        return self._pack(P.reply("push_weights", rid, residual_version=version))

    # --- helpers ------------------------------------------------------------------------------------------------
    def _pack(self, msg: dict) -> bytes:
        return P.pack(msg)

    def _error(self, rid, code, fld, message) -> bytes:
        self.stats["errors"] += 1
        return P.pack(P.error_reply(rid, code, fld, message))

    def active_sessions(self, within_s: float = 1.0) -> int:
        """Sessions that sent a request in the last ``within_s`` seconds."""
        now = time.monotonic()
        return sum(1 for s in self.sessions.values() if now - s.last_seen <= within_s)

    def _sweep(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sweep < 10.0:
            return
        self._last_sweep = now
        for sid in [sid for sid, s in self.sessions.items()
                    if not s.pending and now - s.last_seen > self.cfg.session_ttl_s]:
            del self.sessions[sid]


class PolicyServer:
    """The ZeroMQ loop around a :class:`PolicyService` (one ROUTER socket, one thread).

    Raises ConfigError from :meth:`bind` when the address is in use or cannot be bound.
    """

    def __init__(self, service: PolicyService):
        import zmq

        self.zmq = zmq
        self.service = service
        self.cfg = service.cfg
        self.ctx = zmq.Context.instance()
        self.sock = None
        self.endpoint = None
        self._stop = False

    def bind(self) -> str:
        """Bind and return the endpoint ``tcp://host:port`` (the real port when port 0 was asked for)."""
        zmq = self.zmq
        host = self.cfg.host
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.cfg.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        h = f"[{host}]" if ":" in host else host
        try:
            if self.cfg.port == 0:
                port = sock.bind_to_random_port(f"tcp://{h}", min_port=20000, max_port=60000, max_tries=200)
            else:
                sock.bind(f"tcp://{h}:{self.cfg.port}")
                port = self.cfg.port
        except zmq.ZMQError as e:
            sock.close(0)
            import errno

            if e.errno == errno.EADDRINUSE:
                raise ConfigError("port", f"{host}:{self.cfg.port} is already in use",
                                  "choose another --port (0 = any free port) or stop the process using it") from None
            raise ConfigError("host", f"cannot bind tcp://{h}:{self.cfg.port} ({e})",
                              "use a local address such as 127.0.0.1") from None
        self.sock = sock
        self.endpoint = f"tcp://{h}:{port}"
        return self.endpoint

    def stop(self) -> None:
        self._stop = True

    def _send(self, envelope, payload) -> None:
        try:
            self.sock.send_multipart([*envelope, payload], flags=self.zmq.NOBLOCK, copy=False)
        except self.zmq.ZMQError:  # peer gone / its queue full: drop the reply, the client retries
            pass

    def serve_forever(self, poll_ms: int = 100) -> None:
        """Serve until :meth:`stop` (or SIGINT/SIGTERM set by the caller). Never returns on a bad request."""
        zmq = self.zmq
        if self.sock is None:
            self.bind()
        svc, sock = self.service, self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        pending: list[Pending] = []
        busy: list = []  # (envelope, payload, t_recv) of requests for sessions already pending
        deadline = math.inf
        window = self.cfg.batch_window_ms / 1e3

        def dispatch(envelope, payload, t_recv, t_open):
            """Answer now, queue for the next batch (whose window opens at ``t_open``), or park the request while
            its session already has one pending."""
            nonlocal deadline
            reply, p = svc.handle(payload, t_recv)
            if reply is not None:
                self._send(envelope, reply)
            elif p is not None:
                p.envelope = envelope
                if not pending:
                    deadline = t_open + window
                pending.append(p)
            else:
                busy.append((envelope, payload, t_recv))

        try:
            while not self._stop:
                now = time.perf_counter()
                timeout = poll_ms if not pending else max(0.0, (deadline - now) * 1e3)
                events = dict(poller.poll(timeout))
                if events.get(sock):
                    for _ in range(10_000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        t_recv = time.perf_counter()
                        envelope, payload = self._split(frames)
                        if payload is not None:
                            dispatch(envelope, payload, t_recv, t_recv)
                if pending and (len(pending) >= self.cfg.max_batch or time.perf_counter() >= deadline
                                or len(pending) >= svc.active_sessions()):
                    batch = pending[:self.cfg.max_batch]
                    del pending[:self.cfg.max_batch]
                    for p, r in zip(batch, svc.run_batch(batch)):
                        self._send(p.envelope, r)
                    if pending:
                        deadline = time.perf_counter()  # leftovers run next (they already waited)
                    redo = busy[:]
                    busy.clear()
                    for envelope, payload, t_recv in redo:
                        dispatch(envelope, payload, t_recv, time.perf_counter())
                svc._sweep()
        finally:
            sock.close(0)
            self.sock = None

    def _split(self, frames):
        """ROUTER frames -> (envelope, payload). DEALER peers send [id, payload]; REQ peers [id, b'', payload]."""
        if len(frames) == 2:
            return frames[:1], frames[1]
        if len(frames) == 3 and frames[1] == b"":
            return frames[:2], frames[2]
        if frames:
            self.service.stats["requests"] += 1
            self._send(frames[:1], self.service._error(None, "decode", "message",
                                                       "send each request as exactly one ZeroMQ frame"))
        return None, None


class EmbeddedServer:
    """A :class:`PolicyServer` on a background thread of this process, on a free loopback port with a fresh random
    token: lets an in-process caller use the client-side machinery (async chunks, temporal ensembling) unchanged.
    ``address`` (host:port) and ``token`` are what a client needs; :meth:`close` stops and joins the thread.
    Raises ConfigError like :func:`serve` for a bad checkpoint or residual."""

    def __init__(self, base_path: str, residual_path: str | None = None, *, control_rate_hz: float = 10.0,
                 device: str = "cpu"):
        import secrets
        import threading

        self.token = secrets.token_urlsafe(24)
        cfg = ServeConfig(host="127.0.0.1", port=0, token=self.token, control_rate_hz=control_rate_hz,
                          allow_push=False)
        self.server = load_server(base_path, residual_path, cfg, device)
        self.address = self.server.bind().removeprefix("tcp://")
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_ms": 20}, daemon=True,
                                       name="robot_rl-embedded-server")
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(timeout=5.0)


def load_server(base_path: str, residual_path: str | None, config: ServeConfig, device: str = "cpu") -> PolicyServer:
    """Validate ``config``, load the base (+ residual) checkpoints and wrap them in an unbound :class:`PolicyServer`.
    Raises ConfigError as :func:`serve`."""
    from robot_rl.policies.checkpoint import load_policy
    from robot_rl.rl.residual import load_residual

    cfg = config.validate()
    base = load_policy(base_path, device=device)
    res = load_residual(residual_path, base) if residual_path else None
    return PolicyServer(PolicyService(base, res, cfg))


def serve(base_path: str, residual_path: str | None = None, config: ServeConfig | None = None, *,
          device: str = "cpu", ready=print) -> None:
    """Load the checkpoints, bind, announce ``ready(line)`` and serve until SIGINT/SIGTERM.

    Raises ConfigError for a missing/pickled/corrupt checkpoint, a residual that does not match the base, bad
    parameters, or an address in use.
    """
    import signal

    server = load_server(base_path, residual_path, config or ServeConfig(), device)
    cfg, service = server.cfg, server.service
    endpoint = server.bind()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.token is None:
        print(f"robot-rl serve: warning: listening on {cfg.host} without a token: anyone who can reach this "
              "port can query the policy and push weights (use --token-file, or --no-weight-push)", file=sys.stderr)

    def _stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    ready(f"robot-rl serve: listening on {endpoint} (base {service.base.config.kind} {service.base_version}, "
          f"residual {'v0 ' + service.residual_digest if service.residual is not None else 'none'}, "
          f"max_batch {cfg.max_batch}, "
          f"window {cfg.batch_window_ms} ms, auth {'on' if cfg.token else 'off'})")
    sys.stdout.flush()
    server.serve_forever()

