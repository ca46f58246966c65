"""What the proxy says about its calls: completion records, metrics, prices."""
