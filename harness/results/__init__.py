"""A run directory: its own typed records (manifest, cell records), the guests' files read as data, the tables."""
