"""What the tests stand on: the fake upstream, real servers the suite starts, and small helpers."""
