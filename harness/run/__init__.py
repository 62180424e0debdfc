"""Running an experiment's cells: the schedule, the runner, and whether a cell measured what it was for."""
