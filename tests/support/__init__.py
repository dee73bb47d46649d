"""Helpers shared by tests: a file-backed stand-in backend and an echo/sink TCP server."""
