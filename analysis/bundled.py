"""The YAML configs shipped inside the package (`configs/` of the repository, package data
`analysis/configs/`), so an installed wheel has them too.

    refusal-sae config list                    # quickstart, coconot-local, sae/smollm2, ...
    refusal-sae config show quickstart > my.yaml
    refusal-sae pipeline -c quickstart --out runs/q    # -c NAME falls back to the bundled config

`-c PATH` always means the file when it exists; only a missing path is looked up here, by name
(`quickstart`, `sae/smollm2`, `configs/quickstart.yaml` all name the same bundled file).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundle_dir() -> Path:
    """The folder of bundled configs (inside the installed package, or the repository's `configs/`)."""
    return Path(str(resources.files("analysis") / "configs"))


def bundled_names() -> list[str]:
    """Every bundled config's name: its path under the bundle without `.yaml`, sorted."""
    root = bundle_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def bundled_config(name: str) -> Path | None:
    """The bundled file `name` names (`quickstart`, `sae/smollm2.yaml`, `configs/quickstart.yaml`), or None."""
    key = name.strip().replace("\\", "/")
    key = key[len("configs/"):] if key.startswith("configs/") else key
    key = key[: -len(".yaml")] if key.endswith(".yaml") else key
    if not key or ".." in key.split("/") or key.startswith("/"):
        return None
    path = bundle_dir() / f"{key}.yaml"
    return path if path.is_file() else None


def resolve_config_path(value: str) -> str:
    """`-c VALUE`: the path when it exists, else the bundled config of that name, else VALUE unchanged."""
    if Path(value).exists():
        return value
    found = bundled_config(value)
    return str(found) if found is not None else value
