"""The operator pages: the log views, spend, /health, /ready and their rate limits."""
