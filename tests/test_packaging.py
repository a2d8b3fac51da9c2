"""The distribution as users get it: a built wheel imports from outside the repository, the
three import names map to the three folders, and the light packages stay light."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_outside_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "dist").glob("chunkmesh-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("mesh/faces/cli.py", "mesh/codecs/frames.py", "mesh/coordinator/store.py", "mesh/tasks/builtin.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("codecs/", "coordinator/", "tests/"))]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    probe = (
        "import sys, mesh, mesh.codecs.frames, mesh.coordinator.store;"
        f"assert mesh.__file__.startswith({str(site)!r}), mesh.__file__;"
        "heavy = {'zmq', 'structlog', 'psutil', 'rich'} & set(sys.modules);"
        "assert not heavy, heavy;"
        "from mesh import Client; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == b"ok", out.stderr.decode()


def test_console_scripts_and_python_dash_m():
    bindir = Path(sys.executable).parent
    for script in ("meshctl", "meshd"):
        out = subprocess.run([str(bindir / script), "--help"], capture_output=True, timeout=60)
        assert out.returncode == 0 and b"usage:" in out.stdout, script
    out = subprocess.run([sys.executable, "-m", "mesh", "--help"], capture_output=True, timeout=60)
    assert out.returncode == 0 and b"meshctl" in out.stdout


def test_no_pickle_marshal_or_eval_in_product_code():
    offenders = []
    for folder in ("mesh", "coordinator", "codecs"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for word in ("import pickle", "from pickle", "import marshal", "eval(", "exec("):
                if word in text:
                    offenders.append(f"{path.relative_to(REPO)}: {word}")
    assert not offenders
