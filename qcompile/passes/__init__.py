"""Relax passes written for qcompile, one per file."""
