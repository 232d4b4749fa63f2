"""Install anywhere: a built wheel carries ``conf/``, and its console script runs from any folder.

The wheel is built from a copy of the sources and installed with ``--no-deps`` into a fresh
virtualenv that sees this environment's packages (through a ``.pth`` file), so the test needs
no network and takes seconds; only ``lora_lightning`` comes from the wheel, which the test checks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import test_app
from test_app import ROOT, subprocess_env, tiny_args

tiny_model_dir = test_app.tiny_model_dir  # the shared fixture (pytest finds it by this name)

SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "lora_lightning", "conf")


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("lora_lightning-*.whl")
    return wheel


def _venv_seeing_this_environment(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # A plain path line: this environment's own .pth files (the editable install of
    # lora_lightning among them) are not processed, so lora_lightning comes from the wheel.
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "parent_environment.pth").write_text("\n".join(paths) + "\n")
    return venv


@pytest.mark.slow
def test_wheel_ships_the_configs_and_its_console_script_runs_from_anywhere(
    tiny_model_dir, tmp_path
):
    wheel = _build_wheel(tmp_path)
    assert "lora_lightning/app/conf/train.yaml" in zipfile.ZipFile(wheel).namelist()
    venv = _venv_seeing_this_environment(tmp_path)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def installed(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*args], cwd=elsewhere, env=subprocess_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    # Three independent processes, started together: each is mostly a single-threaded
    # interpreter start, and CI has 2 cores.
    script = str(venv / "bin" / "lora-lightning-train")
    out = elsewhere / "run"
    job = installed(script, *tiny_args(tiny_model_dir), "logger=csv", f"hydra.run.dir={out}")
    help_text = installed(script, "--help")
    where = installed(str(venv / "bin" / "python"), "-c",
                      "import lora_lightning.app as app; print(app.CONF_DIR)")  # fmt: skip
    try:
        # The longest first: the two short ones print far less than a pipe holds.
        (job_out, job_err), (help_out, _), (where_out, where_err) = (
            p.communicate(timeout=300) for p in (job, help_text, where)
        )
    finally:
        for process in (job, help_text, where):
            process.kill()
    assert where_out.strip().startswith(str(venv)), where_out + where_err
    assert help_text.returncode == 0 and "lora_export: default" in help_out
    assert job.returncode == 0, job_out[-3000:] + job_err[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "train.log").read_text().count("Finished") == 1
