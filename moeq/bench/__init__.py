"""Bench stage: llama-bench / llama-perplexity runners and their log parsers (issue 7)."""
