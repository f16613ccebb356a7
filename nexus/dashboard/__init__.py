"""The live dashboard: static HTML, CSS and JS served at ``/`` (no build step, nothing from another
origin) and the ``/ws`` push channel that keeps it current. See ``ws.py``."""

from __future__ import annotations

from .ws import dashboard_routes

__all__ = ["dashboard_routes"]
