"""worldgen: autoregressive, streaming world models learned from recorded play.

Public entry points: ``from worldgen import WorldModel`` and the ``worldgen`` command.
"""

__version__ = "0.1.0"
__all__ = ["WorldModel"]


def __getattr__(name: str) -> type:
    # Lazy: `worldgen record` and friends should not pay for importing torch models.
    if name == "WorldModel":
        from worldgen.engine import WorldModel

        return WorldModel
    raise AttributeError(f"module 'worldgen' has no attribute {name!r}")
