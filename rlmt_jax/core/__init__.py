"""Leaf helpers every stage uses and that use no stage: the user-error type, atomic files, JSON lines, the
tool's cache folder."""
