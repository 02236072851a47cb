"""The wire protocol between ``worldgen serve`` and its clients (``docs/protocol.md`` has it
message by message). Pure data: no torch, no engine, so every client can import it.

Every message is one binary websocket message holding one msgpack map with a ``type`` field.
The client opens with ``hello`` (carrying :data:`VERSION`); the server answers ``welcome`` or
an ``error`` and a close. After that the client sends ``action`` and ``reset``, and the server
streams ``frame`` and ``stats`` messages, and an ``error`` for each message it cannot use.

Example:
    >>> raw = pack(hello(seed=3))
    >>> parse(raw, max_bytes=4096)["type"], parse(raw, max_bytes=4096)["version"] == VERSION
    ('hello', True)
    >>> parse(b"\\xc1", max_bytes=4096)
    Traceback (most recent call last):
    ...
    worldgen.server.protocol.ProtocolError: bad_message: not msgpack: FormatError
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack

# Bumped on any change a client of the previous version could misread.
VERSION = 1
WS_PATH = "/ws"  # the websocket endpoint; every other path is the browser client over HTTP
DEFAULT_PORT = 8765
MAX_MESSAGE_BYTES = 4096  # the largest client message the server reads (actions are ~60 bytes)

# Error codes (the ``code`` of an ``error`` message). Fatal ones are followed by a close with
# the code given here; the others leave the session as it was.
FATAL_CLOSE = {
    "hello_required": 4400,  # first message was not a hello
    "unauthorized": 4401,  # missing or wrong token
    "idle_timeout": 4408,  # nothing received for --idle-timeout seconds
    "version_mismatch": 4426,  # hello.version != VERSION
    "slow_reader": 4413,  # a send to the client waited --send-timeout seconds: it does not read
    "internal": 4500,  # the engine failed on this session
    "busy": 4503,  # --max-sessions sessions already live
}
NONFATAL = (
    "bad_message",  # not a binary msgpack map with a string ``type``
    "too_large",  # longer than the server's max message size
    "unknown_type",  # ``type`` is not one this version knows
    "bad_field",  # a field is missing or of the wrong type
    "bad_action",  # fields have the right types but the action breaks the schema
    "unexpected",  # a known message at the wrong time (a second hello)
    "rate_limited",  # more messages than --max-rate per second: the excess is dropped (at most one per second)
)

# Fields each client message may carry: name -> (accepted Python types, required). Unknown
# extra fields are ignored, so a newer client can add optional ones without a version bump.
_NUM = (int, float)
CLIENT_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"version": ((int,), True), "token": ((str,), False), "seed": ((int,), False), "client": ((str,), False)},
    "action": {"keys": ((list,), False), "mouse": ((list,), False), "t": (_NUM, False)},
    "reset": {"seed": ((int,), False)},
}
MAX_SEED = 2**32 - 1


class ProtocolError(ValueError):
    """A client message the server cannot use. ``code`` is one of :data:`NONFATAL` or
    :data:`FATAL_CLOSE`; ``str(e)`` is ``"code: message"``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    """msgpack -> Python; raises :class:`ProtocolError` ``bad_message`` on anything malformed."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise ProtocolError("bad_message", f"not msgpack: {type(e).__name__}" + (f": {e}" if str(e) else "")) from None


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({int: "integer", float: "number", str: "string", list: "array"}[t] for t in types)


def parse(raw: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Check one client message and return it as a dict whose known fields have the right
    types. Raises :class:`ProtocolError` with the code the server sends back."""
    if isinstance(raw, str):
        raise ProtocolError("bad_message", "text message; send binary msgpack")
    if len(raw) > max_bytes:
        raise ProtocolError("too_large", f"message of {len(raw)} bytes; the limit is {max_bytes}")
    msg = unpack(raw)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", "a message must be a msgpack map with a string 'type' field")
    fields = CLIENT_FIELDS.get(msg["type"])
    if fields is None:
        raise ProtocolError(
            "unknown_type", f"unknown message type {msg['type'][:40]!r}; known: {', '.join(CLIENT_FIELDS)}"
        )
    for name, (types, required) in fields.items():
        value = msg.get(name)
        if value is None:
            if required:
                raise ProtocolError("bad_field", f"{msg['type']}.{name} is required")
            continue
        # bool is an int subclass in Python but never a valid number here.
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(
                "bad_field", f"{msg['type']}.{name} must be {_type_name(types)}, got {type(value).__name__}"
            )
    seed = msg.get("seed") if "seed" in fields else None  # elsewhere an ignored extra field
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ProtocolError("bad_field", f"{msg['type']}.seed must lie in [0, {MAX_SEED}], got {seed}")
    if msg["type"] == "action":
        _check_action_values(msg)
    return msg


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool)


def _check_action_values(msg: dict[str, Any]) -> None:
    """Element types the field table cannot express: keys all names or all integers, mouse
    numbers (never strings or booleans, which numpy would quietly convert), ``t`` finite."""
    keys, mouse, t = msg.get("keys"), msg.get("mouse"), msg.get("t")
    if keys is not None and not (
        all(isinstance(k, str) for k in keys) or all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
    ):
        raise ProtocolError("bad_action", "action.keys must be all key names or all integers 0/1")
    if mouse is not None and not all(_is_number(m) for m in mouse):
        raise ProtocolError("bad_action", "action.mouse must be numbers [yaw, pitch]")
    if t is not None and not math.isfinite(t):
        raise ProtocolError("bad_field", f"action.t must be a finite number, got {t}")


def now_ms() -> float:
    """The clock clients stamp actions with (``t``) and measure latency on: monotonic ms."""
    return time.monotonic() * 1000.0


# Builders, so both ends spell the messages the same way.


def hello(
    token: str | None = None, seed: int | None = None, client: str = "python", version: int = VERSION
) -> dict[str, Any]:
    return {"type": "hello", "version": version, "token": token, "seed": seed, "client": client}


def action(
    keys: list[str] | list[int] = (), mouse: tuple[float, float] = (0.0, 0.0), t: float | None = None
) -> dict[str, Any]:
    return {
        "type": "action",
        "keys": list(keys),
        "mouse": [float(mouse[0]), float(mouse[1])],
        "t": now_ms() if t is None else t,
    }


def reset(seed: int | None = None) -> dict[str, Any]:
    return {"type": "reset", "seed": seed}


def error(code: str, message: str) -> dict[str, Any]:
    assert code in FATAL_CLOSE or code in NONFATAL, code
    return {"type": "error", "code": code, "message": message, "fatal": code in FATAL_CLOSE}
