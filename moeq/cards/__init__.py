"""Model cards: the card stage (stage.py), and render, lint, verify and preview of a card."""
