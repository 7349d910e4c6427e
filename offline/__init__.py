"""Offline jobs over files and recorded sessions: track, refine (and later render, batch)."""
