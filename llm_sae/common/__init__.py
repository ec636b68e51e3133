"""The lowest layer: atomic files and checksums, devices, threads, fault points, PNG."""
