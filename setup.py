"""Build step that pyproject.toml cannot declare: install ``hmt_adapter_autoload.pth`` at the root of site-packages.

Python runs the ``import`` line of every ``.pth`` file there at start-up; this one installs
``_hmt_adapter_autoload``'s finder, which registers HMT with PEFT and lm-eval when they are imported (see
docs/design.md, "Loading without `import hmt_adapter`"). Everything else about the package is in pyproject.toml.

A wheel (``pip install .``) gets the file at its root, i.e. in site-packages. An editable install (``pip install
-e .``) builds no package files into its wheel, so the file goes into the editable wheel's root directly (the
folder setuptools' ``editable_wheel`` hands to ``install`` as ``install_lib`` and packs whole).
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hmt_adapter_autoload.pth"
# One line (site.py runs a .pth line that starts with "import"), quiet if the module is gone; it imports nothing
# else (the module reads HMT_ADAPTER_AUTOLOAD itself).
PTH_LINE = (
    "import sys; exec('try:\\n import _hmt_adapter_autoload as m\\nexcept ImportError:\\n pass\\n"
    "else:\\n m.install()')\n"
)


class build_py_with_pth(build_py):
    """`build_py` that also writes `PTH_NAME` at the root of what is installed."""

    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)


setup(cmdclass={"build_py": build_py_with_pth})
