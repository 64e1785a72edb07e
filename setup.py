"""The build step of nca-trl; everything else about the package is in pyproject.toml.

The repository's `recipes/` and `data/` folders are the one source of the recipes, accelerate configs and bundled
data. A wheel carries a copy of them inside the package, `nca_trl/bundled/recipes` and `nca_trl/bundled/data`,
written here when the package is built; `nca_trl.runtime.bundled` finds them there, or, in a clone and an editable
install (`pip install -e .`), in the repository itself, so nothing is copied into the source tree.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = Path(__file__).resolve().parent
#: What the wheel bundles: repository folder -> folder inside nca_trl/bundled/
BUNDLED = ("recipes", "data")


class BuildPyWithBundle(build_py):
    """`build_py`, then the repository's recipes/ and data/ copied into nca_trl/bundled/ of the build (not for an
    editable install, which reads them where they are)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in BUNDLED:
            target = self._bundle_dir() / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(SOURCE / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(self._bundle_dir() / path.relative_to(SOURCE))
                          for name in BUNDLED for path in sorted((SOURCE / name).rglob("*")) if path.is_file()
                          and "__pycache__" not in path.parts]

    def _bundle_dir(self) -> Path:
        return Path(self.build_lib) / "nca_trl" / "bundled"


setup(cmdclass={"build_py": BuildPyWithBundle})
