"""Clients that speak the wire protocol (``docs/protocol.md``): the browser client
(``web/``, static files the server hands out), the pygame client (``play``, ``worldgen play``)
and the Python client (``client``) that scripts, tests and benchmarks use.
"""
