"""Test main whose import fails."""

raise ImportError("this module cannot be imported on purpose")
