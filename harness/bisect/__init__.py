"""Bisect: the first commit of a git range that changed what the guests feel (a metric of the A/B), what a
mechanism does (an evidence counter), or whether the experiment's hypothesis holds. history.py reads the range,
search.py is the bisection itself (no I/O), judge.py reads a commit's measured boots by the criterion, steps.py
measures a commit (an experiment run of one variant, built incrementally in the shared tree), outputs.py writes
the log, the table, the plot and the report; driver.py runs the whole."""
