"""Model cards: facts from records -> Jinja -> README.md with frontmatter; card lint (issue 5)."""
