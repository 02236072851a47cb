"""Websocket streaming server: protocol, sessions, batched scheduler (docs/serving.md).

``protocol`` is the wire format (``docs/protocol.md`` message by message; no torch), ``app`` the
server, ``cli`` the ``worldgen serve`` command.
"""
