"""The upstream key pool: key specs, the pool that leases keys per call, and the shared key state."""
