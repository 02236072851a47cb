"""Websocket streaming server: protocol, sessions, batched GPU scheduler (DESIGN.md section 8)."""
