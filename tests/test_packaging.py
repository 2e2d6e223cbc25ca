"""The declared dependency bounds: pyproject's lower bounds are what constraints-lowest.txt pins (and
`make test-lowest` tests), and the versions CI pins in constraints.txt satisfy pyproject."""

import importlib
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _declared() -> dict[str, Requirement]:
    """The requirements `make test` installs (runtime, the ``cpu`` and ``dev`` extras) by canonical name."""
    project = _project()
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in [*project["dependencies"], *extras["cpu"], *extras["dev"]]]
    return {canonicalize_name(r.name): r for r in requirements}


def _pins(name: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file by canonical name."""
    pins = {}
    for line_no, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{name}:{line_no}: {line!r} is not a name==version pin"
        pins[canonicalize_name(requirement.name)] = specs[0].version
    return pins


def test_lower_bounds_are_the_lowest_constraints():
    declared, lowest = _declared(), _pins("constraints-lowest.txt")
    missing = sorted(set(declared) - set(lowest))
    assert not missing, f"constraints-lowest.txt does not pin {missing} (at pyproject.toml's lower bounds)"
    for name, requirement in declared.items():  # extra pins there are transitive dependencies
        bounds = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(bounds) == 1, f"pyproject.toml: {requirement} needs one '>=' lower bound"
        assert lowest[name] == bounds[0], (
            f"pyproject.toml declares {requirement} but constraints-lowest.txt pins {name}=={lowest[name]}: "
            "change both together (and run `make test-lowest`)"
        )


def test_ci_pins_satisfy_the_declared_ranges():
    pinned = _pins("constraints.txt")
    for name, requirement in _declared().items():
        if name in pinned:
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
            )


def test_faiss_comes_from_exactly_one_extra():
    """faiss-cpu and faiss-gpu-cu12 install the same ``faiss`` module: each is behind its own extra, never both,
    and the Makefile's installs (`make demo`, `make test`, `make test-lowest`) take the CPU one."""
    project = _project()
    faiss_of = {
        extra: sorted(
            canonicalize_name(Requirement(r).name)
            for r in requirements
            if canonicalize_name(Requirement(r).name).startswith("faiss")
        )
        for extra, requirements in {"": project["dependencies"], **project["optional-dependencies"]}.items()
    }
    assert {extra: names for extra, names in faiss_of.items() if names} == {
        "cpu": ["faiss-cpu"],
        "gpu": ["faiss-gpu-cu12"],
    }
    installs = [line.strip() for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines() if " -e " in line]
    assert installs and all("-e '.[cpu" in line for line in installs), installs


def test_without_faiss_the_index_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if `pip install absvl` had been run without an extra
    monkeypatch.delitem(sys.modules, "absvl.retrieval.faiss_backend", raising=False)
    with pytest.raises(ImportError, match=r"needs FAISS: pip install 'absvl\[cpu\]' \(faiss-cpu\) or 'absvl\[gpu\]'"):
        importlib.import_module("absvl.retrieval.faiss_backend")
