"""Compare networks on this machine: timing, memory and the report."""
