"""tidal: a hardware-aware inference serving runtime."""

__version__ = "0.1.0"
