"""Policy server and client: a frozen base (+ residual) served over ZeroMQ with a typed, versioned msgpack protocol.

- :mod:`robot_rl.serve.protocol` — the wire format (message types, field checks, array encoding, limits).
- :mod:`robot_rl.serve.server` — ``PolicyService`` (sessions, batching, weight push) and ``PolicyServer`` (socket).
- :mod:`robot_rl.serve.client` — ``PolicyClient`` (deadlines, retries, reconnect), ``AsyncChunkClient`` (async
  chunk execution with temporal ensembling), ``RemotePolicy`` (evaluation through a server).
- :mod:`robot_rl.serve.learner` and :mod:`robot_rl.serve.actor` — the actor-learner split of residual TD3: the
  learner runs the server and trains, actor processes act through it and stream ``transitions`` back, weights
  return by ``push_weights``; ``learn_online`` (``robot-rl learn``) learns from actors it did not start (a robot's
  policy node) and commits every episode to a store.

Why ZeroMQ + msgpack (and not gRPC + protobuf): one ROUTER socket lets a single server thread receive from many
clients, hold requests and answer them in any order, which is what dynamic batching across sessions needs, and a
DEALER client may pipeline several requests (one per env) on one connection; reconnection is automatic, and
``ZMQ_MAXMSGSIZE`` drops an over-long message before it is read into memory. pyzmq and msgpack are small wheels
with no code generation step (gRPC needs protoc output that must match the protobuf runtime), and both have
C/C++ implementations for a C++ ROS 2 node. What protobuf would give for free — a typed schema — is written out in
``protocol.py``: every field of every message is checked (type, range, length), arrays travel as
``{dtype, shape, data}`` with an allow-list of dtypes and an exact byte count, unknown fields are refused, and the
message carries a protocol version. Nothing is ever unpickled (msgpack extension types are refused too).
Not measured: gRPC's latency on this machine; the ZeroMQ loopback overhead is in ``bench/bench_server.py``.
"""
