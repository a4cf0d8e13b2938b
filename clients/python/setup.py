"""Build pagedserve-client from the repository's sources, two directories up.

The wheel holds pagedserve/client, pagedserve/protos (with v1) and pagedserve/errors.py, and on
purpose not pagedserve/__init__.py: with only the SDK installed, `pagedserve` is then a PEP 420
namespace package holding just these; with the full project installed, its regular package
(which contains the same client) wins. The version is pagedserve's own (its __version__).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCE = ROOT / "pagedserve"
if not (SOURCE / "client").is_dir():
    raise SystemExit(f"pagedserve-client builds from a pagedserve checkout; {SOURCE} is missing "
                     "(build it in place, e.g. `pip wheel --no-deps clients/python`)")

PACKAGES = ["pagedserve.client", "pagedserve.protos", "pagedserve.protos.v1"]
MODULES = ["pagedserve.errors"]
LEFT_OUT = {("pagedserve", "__init__")}  # see the docstring


def version() -> str:
    text = (SOURCE / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("no __version__ in pagedserve/__init__.py")
    return match.group(1)


class BuildPy(build_py):
    """build_py that never copies pagedserve/__init__.py (py_modules would add it), and that
    starts from an empty build/lib, so files deleted from the sources never linger in a wheel."""

    def run(self):
        shutil.rmtree(self.build_lib, ignore_errors=True)
        super().run()

    def find_modules(self):
        return [m for m in super().find_modules() if (m[0], m[1]) not in LEFT_OUT]


# Build byproducts (build/lib, the egg-info) stay in clients/python/build, not beside the
# repository's own package.
(HERE / "build").mkdir(exist_ok=True)

setup(
    version=version(),
    package_dir={"": "../.."},
    packages=PACKAGES,
    py_modules=MODULES,
    package_data={"pagedserve.protos.v1": ["*.pyi"]},
    include_package_data=False,
    cmdclass={"build_py": BuildPy},
    options={"egg_info": {"egg_base": "build"}},
)
