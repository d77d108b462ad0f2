"""rexecd: a self-contained container runtime daemon serving the Rexec Container API."""

__version__ = "0.1.0"
