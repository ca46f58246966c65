"""The request log store: SQLite or PostgreSQL, its queries and aggregates."""
