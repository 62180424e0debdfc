"""One error type per thing a user can get wrong; the CLI prints the message and exits non-zero."""


class HarnessError(Exception):
    """Base: a message a user can act on. Never a traceback on the terminal."""


class ConfigError(HarnessError):
    pass


class SourceError(HarnessError):
    pass


class UnsupportedKernel(HarnessError):
    pass


class PatchError(HarnessError):
    pass


class KconfigError(HarnessError):
    pass


class BuildError(HarnessError):
    pass


class MissingTool(HarnessError):
    def __init__(self, tool: str, package: str):
        super().__init__(
            f"required tool '{tool}' not found: install the Debian package '{package}' "
            f"(apt-get install {package}, or `fab setup`)"
        )
        self.tool, self.package = tool, package


class AccelError(HarnessError):
    pass


class GuestError(HarnessError):
    pass


class PressureError(HarnessError):
    pass


class ResultsError(HarnessError):
    pass


class RemoteError(HarnessError):
    pass


class HostResourceError(HarnessError):
    """The run needs more memory or disk than this host has."""
