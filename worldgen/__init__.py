"""worldgen: autoregressive, streaming world models learned from recorded play.

Public entry points: ``from worldgen import WorldModel`` and the ``worldgen`` command.
"""

__version__ = "0.1.0"
