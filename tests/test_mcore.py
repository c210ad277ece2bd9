"""The supported (Python, megatron-core) pairs: what is installed, what setup.py pins and what the
GPU image builds are the same releases (megatron_tst/mcore.py TESTED)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from megatron_tst import mcore

REPO = Path(__file__).resolve().parents[1]


def _setup_keyword(name: str):
    """A keyword argument of the setup() call in setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_this_environment_is_a_tested_pair():
    """CI runs this on each leg: its megatron-core must be the release TESTED names."""
    assert str(mcore.installed()) == mcore.TESTED[mcore.python_line()], mcore.tested_pair()
    assert mcore.tested_pair() is None


def test_setup_pins_exactly_the_tested_releases():
    requirements = [Requirement(r) for r in _setup_keyword("install_requires")]
    pinned = {}
    for python in mcore.TESTED:
        env = {"python_version": python, "python_full_version": f"{python}.0"}
        specs = [str(r.specifier) for r in requirements if r.name == "megatron-core"
                 and (r.marker is None or r.marker.evaluate(env))]
        assert len(specs) == 1, f"Python {python}: megatron-core requirements {specs}"
        pinned[python] = specs[0]
    assert pinned == {p: f"=={v}" for p, v in mcore.TESTED.items()}
    python_requires = SpecifierSet(_setup_keyword("python_requires"))
    assert {p for p in ("3.10", "3.11", "3.12", "3.13") if f"{p}.1" in python_requires} \
        == set(mcore.TESTED)


def test_dockerfile_refuses_an_untested_pair():
    """The image installs through setup.py's pins and its build runs the tested-pair check,
    which passes here exactly as the Dockerfile runs it."""
    dockerfile = (REPO / "Dockerfile").read_text()
    run = re.search(r"^RUN pip install -e \"\.\[[^\]]*\]\" \\\n\s+&& (python -m megatron_tst\.mcore)",
                    dockerfile, re.M)
    assert run, "the Dockerfile must check the installed pair right after installing"
    assert re.search(r"^COPY .*megatron_tst/mcore\.py", dockerfile, re.M)
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", dockerfile, re.M)
    p = subprocess.run([sys.executable, *run.group(1).split()[1:]], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"megatron-core {mcore.installed()} on Python {mcore.python_line()}" in p.stdout


@pytest.mark.parametrize("version", ["0.17.1", "0.16.1", "0.19.2"])
def test_untested_pair_is_named_with_the_fix(monkeypatch, version):
    from packaging.version import Version

    monkeypatch.setattr(mcore, "installed", lambda: Version(version))
    if mcore.TESTED[mcore.python_line()] == version:
        assert mcore.tested_pair() is None
        return
    why = mcore.tested_pair()
    assert f"megatron-core {version} on Python {mcore.python_line()} is not a tested pair" in why
    assert "Python 3.11 with megatron-core 0.16.1, Python 3.12 with megatron-core 0.19.2" in why
    assert "pip install -e ." in why
    assert mcore.main() == 1
