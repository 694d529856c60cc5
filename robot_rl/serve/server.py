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
  between batches, so no request is dropped and none sees half-loaded weights. A session keeps the residual it
  planned its current chunk with until its next chunk (``run_batch``), so no chunk mixes two weight versions.
  ``transitions`` requests go to the attached learner (``PolicyService.learner``, :mod:`robot_rl.serve.learner`).

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
from collections import OrderedDict
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
    max_message_bytes: larger requests get a ``too_large`` error reply; anything beyond ``2 x max_message_bytes``
    is cut by ZeroMQ itself (the peer is disconnected) before it is read into memory, and at most
    :func:`receive_hwm` requests per connection wait in memory (the server stops reading a connection beyond).
    token: shared secret every request must carry (None: no authentication). control_rate_hz: the rate the policy
    was trained for (reported to clients).
    Session limits (see :meth:`PolicyService.open_session` and docs/SECURITY.md): sessions belong to the *client*
    that opened them (its ZeroMQ routing identity, plus the token when one is set); ``max_sessions`` bounds the
    whole table, ``max_sessions_per_client`` one client's share; a session unused for ``session_idle_s`` seconds
    may be evicted (least recently used first: the client's own when it is at its share, anyone's when the table
    is full) to make room for a new one, and every session unused for ``session_ttl_s`` seconds is dropped.
    allow_push: accept ``push_weights`` (on a non-loopback host only with a token). seed: added to every session's
    default seed.
    """

    host: str = "127.0.0.1"
    port: int = P.DEFAULT_PORT
    max_batch: int = 16
    batch_window_ms: float = 10.0
    max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None
    control_rate_hz: float = 10.0
    max_sessions: int = 1024
    max_sessions_per_client: int = 64
    session_idle_s: float = 5.0
    session_ttl_s: float = 300.0
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
        need(isinstance(self.max_sessions_per_client, int) and 1 <= self.max_sessions_per_client,
             "max_sessions_per_client", f"{self.max_sessions_per_client!r} < 1", "e.g. 64")
        need(self.session_ttl_s > 0, "session_ttl_s", f"{self.session_ttl_s!r} <= 0", "e.g. 300")
        need(0 <= self.session_idle_s <= self.session_ttl_s, "session_idle_s",
             f"{self.session_idle_s!r} not in [0, session_ttl_s={self.session_ttl_s!r}]", "e.g. 5")
        return self


def weights_digest(module: torch.nn.Module) -> str:
    """First 12 hex digits of a SHA-256 over the module's state_dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


#: the client identity of :meth:`PolicyService.process` / :meth:`PolicyService.handle` callers that pass none
#: (an in-process caller: tests, the fuzzer). Socket peers get their ZeroMQ routing identity instead.
LOCAL_CLIENT = b"local"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ARCH_FIELDS = ("obs_keys", "obs_dims", "fine_keys", "action_dim", "hidden", "head", "image_keys",
               "image_encoder")  # fixed for a served residual
_HEADER_SLACK = 64 * 1024  # bytes of a safetensors header (JSON) allowed on top of the tensor bytes of a push
_MAX_LAYERS = 16


def _brief(v) -> str:
    return repr(v)[:80]


class _Session:
    """A client's episode: its :class:`ChunkStream` (history, chunk queue, own generator) and the retry state.
    ``client`` is the key of the client that opened it (see :meth:`PolicyService.client_key`)."""

    __slots__ = ("client", "sid", "stream", "last_step", "last_id", "last_reply", "last_seen", "pending", "residual",
                 "residual_version")

    def __init__(self, client: bytes, sid: str, n_obs: int, seed: int):
        self.client, self.sid = client, sid
        self.stream = ChunkStream(n_obs, seed=seed)
        self.last_step, self.last_id, self.last_reply = -1, None, None
        self.last_seen, self.pending = time.monotonic(), False
        self.residual, self.residual_version = None, 0  # pinned for the current chunk (see PolicyService.run_batch)


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
        self._weights_bytes: tuple = (None, b"")  # ((version, digest), safetensors bytes) of the last weights reply
        self._last_push_sha = None
        self.base_version = weights_digest(base)
        # (client key, session id) -> session, least recently used first; and per client, sid -> session (LRU)
        self.sessions: OrderedDict[tuple[bytes, str], _Session] = OrderedDict()
        self.clients: dict[bytes, OrderedDict[str, _Session]] = {}
        self._push_limit = self._tensor_bytes(residual) + _HEADER_SLACK if residual is not None else None
        self.stats = {"requests": 0, "errors": 0, "batches": 0, "batched_requests": 0, "pushes": 0, "evicted": 0}
        #: the learner that ``transitions`` requests go to (``receive(req) -> reply fields``, ``status() -> map``),
        #: or None (:mod:`robot_rl.serve.learner` attaches one); called on the serving thread
        self.learner = None
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
                         "alpha": res.config.scale if res is not None else None,  # (A,) per dimension
                         "config": residual_config_dict(res) if res is not None else None},
            "batching": {"max_batch": self.cfg.max_batch, "window_ms": float(self.cfg.batch_window_ms)},
            "max_message_bytes": self.cfg.max_message_bytes, "auth_required": self.cfg.token is not None,
            "weight_push": bool(self.cfg.allow_push),
            "session_limits": {"max_sessions": self.cfg.max_sessions,
                               "max_sessions_per_client": self.cfg.max_sessions_per_client,
                               "idle_s": float(self.cfg.session_idle_s), "ttl_s": float(self.cfg.session_ttl_s)},
        }

    # --- request entry points -----------------------------------------------------------------------------------
    def client_key(self, identity: bytes) -> bytes:
        """The key sessions are bound to: the peer's ZeroMQ routing identity (bytes, 1..255), plus a digest of the
        token when the server has one (only requests carrying that token get this far)."""
        if self.cfg.token is None:
            return bytes(identity)
        return bytes(identity) + b"|" + hashlib.sha256(self.cfg.token.encode()).digest()[:8]

    def handle(self, raw, t_recv: float | None = None,
               client: bytes = LOCAL_CLIENT) -> tuple[bytes | None, Pending | None]:
        """One raw request from ``client`` -> (reply bytes, None) when it can be answered now, or (None, Pending)
        for an ``act`` that needs a base call (run it with :meth:`run_batch`), or (None, None) with the session busy
        (the caller must re-submit it after the current batch: see :meth:`process`). Never raises.

        ``client``: the sender's identity (the socket loop passes the ZeroMQ routing identity; default
        :data:`LOCAL_CLIENT` for in-process callers). Sessions are looked up, created and closed in that client's
        namespace only: another client can neither see nor advance them (it gets ``unknown_session``)."""
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
            key = self.client_key(client)
            if t == "act":
                return self._act(req, t_recv, key)
            if t == "metadata":
                return self._pack(P.reply("metadata", rid, **self.metadata())), None
            if t == "ping":
                extra = {"learner": self.learner.status()} if self.learner is not None else {}
                return self._pack(P.reply("ping", rid, time=time.time(), stats=dict(self.stats),
                                          sessions=len(self.sessions), **extra)), None
            if t == "close":
                s = self.sessions.get((key, req["session"]))
                if s is not None:  # (a request of it still in a batch gets its reply; the session is gone after)
                    self._drop(s)
                return self._pack(P.reply("close", rid, closed=s is not None)), None
            if t == "push_weights":
                return self._push(req), None
            if t == "weights":
                return self._weights(rid), None
            if t == "transitions":
                if self.learner is None:
                    raise P.ProtocolError("not_learning", "transitions", "this server has no learner attached; "
                                                                         "start it with robot-rl train-residual "
                                                                         "--actors N")
                P.check_transitions(req, self.spec, self.A)
                return self._pack(P.reply("transitions", rid, **self.learner.receive(req))), None
            raise P.ProtocolError("schema", "type", "unhandled request type")  # unreachable: parse checked it
        except P.ProtocolError as e:
            return self._error(rid, e.code, e.field, e.message), None
        except ConfigError as e:
            return self._error(rid, "value", e.field, f"{e.problem} -> {e.fix}"), None
        except Exception as e:  # a bug must not take the server down: answer and carry on
            return self._error(rid, "internal", "server", f"{type(e).__name__}: {e}"[:500]), None

    def process(self, raws: list, client: bytes = LOCAL_CLIENT) -> list[bytes]:
        """Synchronously answer a list of raw requests (same order), batching all base calls they need. Every
        request is from ``client`` (default :data:`LOCAL_CLIENT`: one in-process caller; pass distinct identities
        to act as several peers, as the socket loop does with ZeroMQ routing identities)."""
        replies: list = [None] * len(raws)
        todo = list(range(len(raws)))
        while todo:
            pend, later = [], []
            for i in todo:
                r, p = self.handle(raws[i], client=client)
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
    def _act(self, req: dict, t_recv: float, client: bytes):
        rid, sid, step = req["id"], req["session"], req["step"]
        frames = P.check_obs(req["obs"], self.spec, self.To)
        s = self.sessions.get((client, sid))
        if s is not None and s.pending:
            return None, None  # one request per session at a time: the caller retries it after the batch
        if s is not None and s.last_id == rid and s.last_reply is not None:  # a client retry: same answer again
            self._touch(s)
            return self._pack({**s.last_reply, "id": rid}), None
        obs = req["obs"]
        fr = [{k: np.array(obs[k][i]) for k in self.spec} for i in range(frames)]  # own, writable copies
        if req["reset"]:
            seed = req["seed"] if req["seed"] is not None else (zlib.crc32(sid.encode()) + self.cfg.seed) % 2**63
            s = self.open_session(client, sid, seed)
            s.stream.reset(fr, step)
        else:
            if s is None:
                raise P.ProtocolError("unknown_session", "session", f"no session {sid!r} of this client on this "
                                                                    "server (new or restarted server, expired, or "
                                                                    "opened over another connection); send "
                                                                    "reset=true with the last n_obs_steps frames")
            if step <= s.last_step:
                raise P.ProtocolError("stale_step", "step", f"step {step} <= last step {s.last_step} of this "
                                                            "session; steps must increase (or send reset=true)")
            for f in fr:
                s.stream.observe(f)
            s.stream.t = step
        self._touch(s)
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
                # the newest residual serves this whole chunk: a push mid-chunk takes effect at the next chunk
                p.session.residual, p.session.residual_version = self.residual, self.residual_version
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
        if s.residual is None:
            r, executed = apply_residual(self.base.normalizer, None, {}, rows)
        else:  # the newest observation's low-dim keys (the residual reads low-dim keys only)
            obs1 = {k: v[None] for k, v in s.stream.latest.items() if self.spec[k]["dtype"] == "float32"}
            parts = []
            # row 0 alone (a batch of one, like per-step in-process execution: bit-identical); rows 1.. together
            for a, b in ((0, 1), (1, n)):
                if b > a:
                    ob = obs1 if b - a == 1 else {k: np.repeat(v, b - a, axis=0) for k, v in obs1.items()}
                    parts.append(apply_residual(self.base.normalizer, s.residual, ob, rows[a:b]))
            r = np.concatenate([p[0] for p in parts])
            executed = np.concatenate([p[1] for p in parts])
        now = time.perf_counter()
        body = P.reply("act", req["id"], session=s.sid, step=step, chunk_start=step,
                       base=P.encode_array(rows), residual=P.encode_array(r), executed=P.encode_array(executed),
                       base_version=self.base_version, residual_version=s.residual_version,
                       new_chunk=t_batch is not None,
                       timing={"queue_ms": ((t_batch - t_recv) * 1e3) if t_batch is not None else 0.0,
                               "base_ms": base_ms, "residual_ms": (now - t0) * 1e3, "batch_size": batch_size,
                               "server_ms": (now - t_recv) * 1e3})
        s.last_id, s.last_reply = req["id"], body
        return self._pack(body)

    # --- weight push --------------------------------------------------------------------------------------------
    def _push(self, req: dict) -> bytes:
        """Apply a weight push. Checked in order of cost, so a flood of bad pushes costs little: push allowed (and
        authenticated off loopback), the weights' byte size (before anything is decoded: at most the served
        residual's tensor bytes + header, or ``max_message_bytes`` without a residual), version, the config (same
        architecture as the served residual, compared as plain data; then built on the meta device, so an
        oversized config allocates nothing, and sized), then the safetensors bytes and the real module."""
        from safetensors.torch import load as st_load

        from robot_rl.rl.residual import build_residual, residual_from_tensors

        rid, version, weights = req["id"], req["version"], req["weights"]
        if not self.cfg.allow_push:
            raise P.ProtocolError("push_rejected", "push_weights", "weight push is disabled on this server "
                                                                   "(started with --no-weight-push)")
        if self.cfg.token is None and self.cfg.host not in LOOPBACK:
            raise P.ProtocolError("auth", "token", f"weight push to a server listening on {self.cfg.host} needs "
                                                   "authentication; restart it with --token-file (or on loopback)")
        limit = self._push_limit or self.cfg.max_message_bytes
        if len(weights) > limit:
            raise P.ProtocolError("too_large", "weights", f"{len(weights)} bytes > {limit} bytes, the size of the "
                                                          "served residual's weights; push a residual of the same "
                                                          "architecture")
        sha = hashlib.sha256(weights).hexdigest()
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
        served = residual_config_dict(self.residual) if self.residual is not None else None
        for k in _ARCH_FIELDS:  # plain data compare: nothing built yet
            if served is not None and k in cfg and cfg[k] != served[k]:
                raise P.ProtocolError("push_rejected", f"config.{k}", f"{_brief(cfg[k])} != the served residual's "
                                                                      f"{_brief(served[k])}; a push may change "
                                                                      "weights and alpha, not the architecture "
                                                                      "(restart the server for another one)")
        if isinstance(cfg.get("hidden"), list) and len(cfg["hidden"]) > _MAX_LAYERS:
            raise P.ProtocolError("push_rejected", "config.hidden", f"more than {_MAX_LAYERS} layers")
        try:
            with torch.device("meta"):  # shapes only: no memory for the parameters
                probe = build_residual(cfg)
            self._check_residual(probe)
        except ConfigError as e:
            raise P.ProtocolError("push_rejected", e.field, f"{e.problem} -> {e.fix}") from None
        need = self._tensor_bytes(probe)
        if need > self.cfg.max_message_bytes:
            raise P.ProtocolError("too_large", "config", f"describes a residual of {need} bytes of weights, more "
                                                         f"than fits in a message ({self.cfg.max_message_bytes} "
                                                         "bytes); push a smaller residual")
        if len(weights) > need + _HEADER_SLACK:
            raise P.ProtocolError("too_large", "weights", f"{len(weights)} bytes for a config of {need} bytes of "
                                                          "weights; send the safetensors file of that residual")
        try:
            tensors = st_load(weights)
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
        self._push_limit = need + _HEADER_SLACK
        self.stats["pushes"] += 1
        return self._pack(P.reply("push_weights", rid, residual_version=version))

    def _weights(self, rid) -> bytes:
        """The ``weights`` reply: the served residual as safetensors bytes (serialised once per version)."""
        from safetensors.torch import save as st_save

        if self.residual is None:
            return self._pack(P.reply("weights", rid, residual_version=self.residual_version, config=None,
                                      weights=None))
        if self._weights_bytes[0] != (self.residual_version, self.residual_digest):
            state = {k: v.detach().cpu().contiguous() for k, v in self.residual.state_dict().items()}
            self._weights_bytes = ((self.residual_version, self.residual_digest), st_save(state))
        return self._pack(P.reply("weights", rid, residual_version=self.residual_version,
                                  config=residual_config_dict(self.residual), weights=self._weights_bytes[1]))

    @staticmethod
    def _tensor_bytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    # --- helpers ------------------------------------------------------------------------------------------------
    def _pack(self, msg: dict) -> bytes:
        return P.pack(msg)

    def _error(self, rid, code, fld, message) -> bytes:
        self.stats["errors"] += 1
        return P.pack(P.error_reply(rid, code, fld, message))

    # --- sessions -----------------------------------------------------------------------------------------------
    def open_session(self, client: bytes, sid: str, seed: int) -> _Session:
        """A fresh session ``sid`` of ``client`` (replacing that client's session of the same id), within the limits:

        1. a client already holding ``max_sessions_per_client`` sessions gets its own least recently used session
           evicted if that one has been idle for ``session_idle_s``; otherwise ProtocolError ``capacity``;
        2. when the whole table holds ``max_sessions``, expired sessions (``session_ttl_s``) are dropped, then the
           least recently used session idle for ``session_idle_s`` (anyone's); otherwise ProtocolError ``capacity``.

        So one peer that opens sessions and abandons them only ever evicts its own, and everyone else can still
        open theirs. The session is not yet touched (the caller sets ``last_seen``)."""
        own = self.clients.get(client)
        old = own.get(sid) if own else None
        if old is not None:
            self._drop(old)
        elif own is not None and len(own) >= self.cfg.max_sessions_per_client:
            if not self._evict(own.values()):
                raise P.ProtocolError(
                    "capacity", "session",
                    f"this client already has {len(own)} sessions open (limit serve.max_sessions_per_client="
                    f"{self.cfg.max_sessions_per_client}), all used in the last {self.cfg.session_idle_s:g} s; close "
                    "sessions it no longer needs (close request / RemotePolicy.close) or reuse their ids")
        if len(self.sessions) >= self.cfg.max_sessions:
            self._sweep(force=True)
            if len(self.sessions) >= self.cfg.max_sessions and not self._evict(self.sessions.values()):
                raise P.ProtocolError(
                    "capacity", "session",
                    f"the server holds {len(self.sessions)} sessions (limit serve.max_sessions="
                    f"{self.cfg.max_sessions}), all used in the last {self.cfg.session_idle_s:g} s; retry later or "
                    "start the server with a larger serve.max_sessions")
        s = _Session(client, sid, self.To, seed)
        self.sessions[(client, sid)] = s
        self.clients.setdefault(client, OrderedDict())[sid] = s
        return s

    def _evict(self, lru) -> bool:
        """Drop the least recently used session of ``lru`` (sessions, oldest use first) if it has been idle for
        ``session_idle_s`` and is not waiting for a batch. True if one was dropped."""
        now = time.monotonic()
        for s in lru:
            if s.pending:
                continue
            if now - s.last_seen < self.cfg.session_idle_s:
                return False
            self._drop(s)
            self.stats["evicted"] += 1
            return True
        return False

    def _touch(self, s: _Session) -> None:
        s.last_seen = time.monotonic()
        self.sessions.move_to_end((s.client, s.sid))
        self.clients[s.client].move_to_end(s.sid)

    def _drop(self, s: _Session) -> None:
        self.sessions.pop((s.client, s.sid), None)
        own = self.clients.get(s.client)
        if own is not None:
            own.pop(s.sid, None)
            if not own:
                del self.clients[s.client]

    def active_sessions(self, within_s: float = 1.0) -> int:
        """Sessions that sent a request in the last ``within_s`` seconds."""
        now = time.monotonic()
        n = 0
        for s in reversed(self.sessions.values()):  # most recently used first: stop at the first older one
            if now - s.last_seen > within_s:
                break
            n += 1
        return n

    def _sweep(self, force: bool = False) -> None:
        """Drop sessions idle for more than ``session_ttl_s`` (at most every 10 s unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_sweep < min(10.0, self.cfg.session_ttl_s):
            return
        self._last_sweep = now
        for s in list(self.sessions.values()):
            if now - s.last_seen <= self.cfg.session_ttl_s:
                break  # least recently used first: the rest are newer
            if not s.pending:
                self._drop(s)


def receive_hwm(max_message_bytes: int) -> int:
    """ZeroMQ receive high-water mark (messages queued per connection before the server stops reading from it):
    about 256 MiB of the largest messages ZeroMQ lets through (2 x ``max_message_bytes``), between 8 and 1000."""
    return max(8, min(1000, 256 * 2**20 // (2 * max_message_bytes)))


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
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, receive_hwm(self.cfg.max_message_bytes))
        sock.setsockopt(zmq.SNDHWM, 10_000)
        # a client reconnecting with its (random) routing identity takes its sessions over from the old connection
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
            reply, p = svc.handle(payload, t_recv, client=envelope[0])
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
    if cfg.host not in LOOPBACK and cfg.token is None:
        print(f"robot-rl serve: warning: listening on {cfg.host} without a token: anyone who can reach this "
              "port can query the policy (weight push is refused without a token; use --token-file, see "
              "docs/SECURITY.md)", file=sys.stderr)

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

