"""Websocket streaming server: protocol, sessions, batched scheduler (DESIGN.md section 8).

``protocol`` is the wire format (``PROTOCOL.md`` message by message; no torch), ``app`` the
server, ``cli`` the ``worldgen serve`` command.
"""
