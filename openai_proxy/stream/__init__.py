"""Streaming: the SSE reader and the relay of upstream events to the client."""
