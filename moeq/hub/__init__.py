"""The Hub: push plan, diff with the remote by sha256, upload; download helpers (issue 6)."""
