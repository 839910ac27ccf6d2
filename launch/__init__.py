"""Absl entry points. Flags end here: nothing in cxrjax/ reads FLAGS."""
