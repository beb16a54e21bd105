"""Only what pyproject.toml cannot say: polar_lm_eval_plugin.pth at the root of site-packages.

The .pth imports polar_lm_eval_plugin at interpreter start, which makes a plain `lm_eval --model polar` work
(see that module); the import is wrapped so that a broken install never prints at every interpreter start.
A wheel installs its root's files into site-packages, so build_py writes the .pth beside the modules in
build_lib; an editable install (`pip install -e .`) does not ship build_lib, so there the .pth goes straight
into the editable wheel being assembled (setuptools points the install command's install_lib at it).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "polar_lm_eval_plugin.pth"
# site.py runs .pth lines that start with `import`; its name sorts after setuptools' __editable__ .pth,
# whose import finder must be in place for an editable install's polar_lm_eval_plugin to be found.
PTH_LINE = r'import sys; exec("try:\n import polar_lm_eval_plugin\nexcept Exception:\n pass")' + "\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        os.makedirs(self._pth_dir(), exist_ok=True)
        with open(os.path.join(self._pth_dir(), PTH), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self._pth_dir(), PTH)]

    def _pth_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib


setup(cmdclass={"build_py": build_py_with_pth})
