"""The project's own promises: conda env agrees with pyproject, notebooks are stripped and parameterised."""

import json
import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str) and not d.startswith("python=")}
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip or "-e .[dev]" in pip
    env_names = conda | {_name(p) for p in pip if not p.startswith("-e")}
    aliases = {"pytorch": "torch", "openslide": "openslide-python"}
    env_names = {aliases.get(n, n) for n in env_names}
    wanted = {_name(d) for d in project["dependencies"]}
    assert wanted - env_names == set(), f"in pyproject, not in environment.yml: {wanted - env_names}"


def test_notebooks_stripped_and_parameterised():
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) >= 1
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{nb_path.name}: needs one cell tagged 'parameters'"
        assert "run_dir" in "".join(params[0]["source"]), nb_path.name
        code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert (
            f'"{nb_path.name[:2]}"' in code and "write_metrics" in code
        ) or f"{nb_path.name[:2]}_metrics.json" in code, (
            f"{nb_path.name}: must write run_dir/{nb_path.name[:2]}_metrics.json"
        )
        for cell in nb["cells"]:
            assert not cell.get("outputs"), f"{nb_path.name} is committed with outputs"
