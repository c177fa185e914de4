"""The push stage: one commit per repo to the Hub (stage.py)."""
