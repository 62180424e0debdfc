"""nestpress tasks. `fab --list`; `fab <task> --help`. Without hosts they run on this machine; with
`-H host` (one host) or `--hosts h1,h2,...` (a fleet: the cells are sharded across the hosts) over SSH.
The first line of output always says where. The tasks are made from the harness's one command table
(harness/commands.py): the same commands and options as `python -m harness`."""

from harness.lab.fabtasks import fab_tasks

globals().update(fab_tasks())
