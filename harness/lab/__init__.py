"""Lab hosts over SSH: one host or a fleet, shipping, detached jobs, fetching results."""
