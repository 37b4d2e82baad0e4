"""`refusal-sae config list | show NAME`: the YAML configs shipped with the package (`analysis.bundled`).

    refusal-sae config list
    refusal-sae config show quickstart > my-run.yaml
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.stages.command import Command


@dataclass(kw_only=True)
class ListInputs:
    """`refusal-sae config list` takes no options."""


@dataclass(kw_only=True)
class ShowInputs:
    """Files of `refusal-sae config show`.

    Args:
        name: a bundled config (`refusal-sae config list`), e.g. quickstart or sae/smollm2.
    """

    name: str


def list_configs(_cfg: None, _inputs: ListInputs) -> list[str]:
    from analysis.bundled import bundle_dir, bundled_names

    names = bundled_names()
    if not names:
        raise FileNotFoundError(f"no bundled configs at {bundle_dir()}")
    return names


def show_list(_inputs: ListInputs, names: list[str]) -> None:
    print("\n".join(names))


def read_config(_cfg: None, inputs: ShowInputs) -> str:
    from analysis.bundled import bundled_config, bundled_names

    path = bundled_config(inputs.name)
    if path is None:
        raise ValueError(f"no bundled config named {inputs.name!r}; bundled: {', '.join(bundled_names())}")
    return path.read_text(encoding="utf-8")


def show_text(_inputs: ShowInputs, text: str) -> None:
    print(text, end="" if text.endswith("\n") else "\n")


COMMANDS = {
    "list": Command(name="config list", help="list the bundled YAML configs", inputs=ListInputs, run=list_configs,
                    show=show_list),
    "show": Command(name="config show", help="print a bundled YAML config", inputs=ShowInputs, run=read_config,
                    show=show_text, positional="name"),
}
