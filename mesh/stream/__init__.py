"""Streams: standing jobs that follow files as they arrive (DESIGN.md, "Streams")."""
