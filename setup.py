"""Package build: the cffi extension plus the static ``rexec-init`` used as container PID 1."""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext


class BuildWithInit(build_ext):
    """Build the cffi module, then compile ``rexec-init`` statically next to it.

    Static, because it runs inside arbitrary images that may have no libc at all.
    """

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        src = os.path.join(here, "rexecd", "_native", "init.c")
        dest_dirs = [os.path.join(here, "rexecd", "_native")]
        if not self.inplace:
            dest_dirs.append(os.path.join(os.path.abspath(self.build_lib), "rexecd", "_native"))
        cc = os.environ.get("CC", "cc")
        for d in dest_dirs:
            os.makedirs(d, exist_ok=True)
            out = os.path.join(d, "rexec-init")
            subprocess.check_call([cc, "-static", "-Os", "-s", "-Wall", "-Werror", "-o", out, src])


setup(
    cffi_modules=["rexecd/_native/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithInit},
)
