"""What the host side and the in-guest agent must agree on, in one place. Standard library only:
the agent imports it by file from its own directory, the host as harness.guest.contract."""

OUT = "/run/nestpress/out"            # where every agent mounts its results export (9p tag `nestout`)
SCRATCH = "/run/nestpress"            # tmpfs in every guest: its children's sockets live here
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # the agent's, and its command's
