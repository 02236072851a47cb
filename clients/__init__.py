"""Clients that speak the wire protocol: browser (static), pygame, Python."""
