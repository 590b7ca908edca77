"""Adapters that put the fused losses into training code users already run."""
