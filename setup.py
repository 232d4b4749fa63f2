"""Build step that ships the top-level ``conf/`` inside the package (everything else is in
pyproject.toml).

``conf/`` stays at the top of the repository, where ``python train.py`` and the docs expect it;
a wheel (or ``pip install .``) gets a copy at ``lora_lightning/app/conf``, which
``lora_lightning.app.config.CONF_DIR`` prefers when it exists. Editable installs read the
checkout's ``conf/`` directly, so nothing is copied for them.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "lora_lightning" / "app" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).resolve().parent / "conf", target)


setup(cmdclass={"build_py": BuildPyWithConf})
