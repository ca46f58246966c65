"""The concurrency gate: slots for upstream calls, on this host (`local`) or across hosts (`shared`)."""
