"""Stage commands: each console subcommand is generated from its stage's Config dataclass.

A `Command` names
- `config` / `section`: the stage's Config dataclass (the only place its defaults live), parsed
  under `--<section>.<key>`, exactly the keys of the pipeline YAML's `<section>:` block;
- `inputs`: a dataclass of what the standalone command reads and writes (`--model`, `--acts`,
  `--out`, ...); in the pipeline the run folder provides these;
- `run(cfg, inputs) -> result` and `show(inputs, result)`.

Every command accepts `-c FILE.yaml` (the same keys, nested) and `--section.key value`, prints its
resolved config with `--print_config` and records it beside its output (`OUT/config.yaml`), and
stops on bad input with one `error:` line and exit status 2. Lists take several values (`--prompts a b`), a bare boolean flag means true (`--harvest.chat_template`),
and old spellings (`--batch-size`, `--no-chat-template`, ...) keep working with a note naming the
new flag.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BAD_INPUT = (ValueError, OSError)
"""Exceptions that mean bad input or an unusable path (missing, not writable, a file where a folder
goes, a full disk): one `error:` line, exit status 2."""

_OS_ERRORS = {
    errno.EEXIST: "cannot create the folder {path}: a file of that name exists",
    errno.ENOTDIR: "cannot use {path}: part of that path is a file, not a folder",
    errno.EISDIR: "{path} is a folder; a file was expected",
    errno.EACCES: "cannot write {path}: permission denied (choose an output location you can write)",
    errno.EPERM: "cannot write {path}: operation not permitted (choose an output location you can write)",
    errno.EROFS: "cannot write {path}: the file system is read-only",
    errno.ENOSPC: "no space left on the device while writing {path}",
    errno.ENOENT: "no such file or folder: {path}",
}


def error_text(exc: BaseException) -> str:
    """The one-line message of a bad-input exception (an OS error names the path and what is wrong)."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS and exc.filename is not None:
        return _OS_ERRORS[exc.errno].format(path=exc.filename)
    return _one_line(exc)


@dataclass(frozen=True)
class Command:
    """One subcommand: its Config section, its inputs, and what it does."""

    name: str
    help: str
    inputs: type
    run: Callable[[Any, Any], Any]
    show: Callable[[Any, Any], None]
    config: type | None = None
    section: str | None = None  # None with a config: the config's fields are top-level flags (pipeline)
    renamed: Mapping[str, Sequence[str]] = field(default_factory=dict)  # old flag -> new tokens
    positional: str | None = None  # an inputs field that also takes leading bare arguments
    extend: Callable[[Any], None] | None = None  # adds extra flag groups (train: --trainer.*)
    old_sections: Mapping[str, str] = field(default_factory=dict)  # old YAML section (or dotted key) -> hint


# --- dataclass introspection ---------------------------------------------------------------------

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _kind(tp: Any) -> str:
    """"list", "bool" or "value" for a field type (Optional stripped)."""
    tp = _strip_optional(tp)
    if tp is bool:
        return "bool"
    return "list" if typing.get_origin(tp) is list else "value"


def flag_kinds(cls: type, prefix: str = "") -> dict[str, str]:
    """`{dotted key: kind}` of every leaf field of dataclass `cls` (nested dataclasses expanded)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out.update(flag_kinds(tp, key + "."))
        else:
            out[key] = _kind(hints[f.name])
    return out


def config_defaults(cls: type) -> dict[str, Any]:
    """The defaults of dataclass `cls` as plain data (what `--help` and the pipeline both show)."""
    return dataclasses.asdict(cls())


# --- argv translation ----------------------------------------------------------------------------

def known_flags(cmd: Command) -> dict[str, str]:
    """`{flag key: kind}` the command's parser accepts (without `--trainer.*` pass-through keys)."""
    flags = flag_kinds(cmd.inputs)
    if cmd.config is not None:
        prefix = f"{cmd.section}." if cmd.section else ""
        flags.update(flag_kinds(cmd.config, prefix))
    return flags


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def translate_argv(cmd: Command, argv: Sequence[str]) -> list[str]:
    """Rewrite old spellings and list / bare-boolean forms into what the parser takes.

    - `--old-flag` in `cmd.renamed` → its new tokens (a note names them);
    - `--foo-bar` → `--foo_bar`; a Config field given without its section → `--section.field`;
    - `--set a.b=v` (the old pipeline override) → `--a.b v`;
    - a list flag followed by several values → one JSON list; a bare boolean flag → `true`;
    - leading bare arguments → the `positional` inputs field.
    """
    flags = known_flags(cmd)
    tokens = list(argv)
    out: list[str] = []
    if cmd.positional and tokens and not tokens[0].startswith("-"):
        values = []
        while tokens and not tokens[0].startswith("-"):
            values.append(tokens.pop(0))
        tokens = [f"--{cmd.positional}", *values, *tokens]
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or token in ("--help", "--print_config") or token.startswith("--print_config="):
            out.append(token)
            continue
        key, eq, value = token[2:].partition("=")
        if key == "set":  # old pipeline override: --set section.key=value
            item = value if eq else (tokens.pop(0) if tokens else "")
            path, _, val = item.partition("=")
            _note(f"--set {item} is now --{path} {val}")
            tokens[:0] = [f"--{path}", val]
            continue
        if key in cmd.renamed:
            new = list(cmd.renamed[key])
            _note(f"--{key} is now {' '.join(new)}")
            tokens[:0] = new + ([value] if eq else [])
            continue
        key = _resolve_key(cmd, key, flags)
        kind = flags.get(key)
        if eq:
            values = [value]
        else:
            values = []
            while tokens and not (tokens[0].startswith("--") and len(tokens[0]) > 2):
                values.append(tokens.pop(0))
        if kind == "list" and not (len(values) == 1 and values[0].lstrip().startswith("[")):
            out += [f"--{key}", json.dumps(values)]
        elif kind == "bool" and not values:
            out += [f"--{key}", "true"]
        else:
            out += [f"--{key}", *values]
    return out


def _resolve_key(cmd: Command, key: str, flags: Mapping[str, str]) -> str:
    """A flag key as the parser spells it (underscores; section prefix added when missing)."""
    if key in flags:
        return key
    under = key.replace("-", "_")
    if under in flags:
        return under
    if cmd.section and f"{cmd.section}.{under}" in flags:
        _note(f"--{key} is now --{cmd.section}.{under}")
        return f"{cmd.section}.{under}"
    return key  # unknown: the parser names it


def resolve_config_names(argv: Sequence[str]) -> list[str]:
    """`-c NAME` of a config file that does not exist → the bundled config of that name, if any
    (`analysis.bundled`: `-c quickstart` or `-c configs/quickstart.yaml` work outside the repository)."""
    from analysis.bundled import resolve_config_path

    out = list(argv)
    for i, token in enumerate(out[:-1]):
        if token in ("-c", "--config"):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def check_config_file(cmd: Command, argv: Sequence[str]) -> None:
    """Stop with one line when a `-c` YAML file uses a section this version renamed."""
    import yaml

    for i, token in enumerate(argv):
        if token in ("-c", "--config") and i + 1 < len(argv):
            path = Path(argv[i + 1])
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
            if not isinstance(data, dict):
                raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
            for old, hint in cmd.old_sections.items():
                node: Any = data
                for part in old.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    what = "key" if "." in old else "section"
                    raise ValueError(f"config file {path}: {what} '{old}' {hint}")


# --- parser, parse, run --------------------------------------------------------------------------

def build_parser(cmd: Command) -> Any:
    """The jsonargparse parser of a command: `-c`, the inputs, the Config section, extras."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"refusal-sae {cmd.name}", description=cmd.help, exit_on_error=False,
                            default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML file with the same keys as the flags")
    parser.add_class_arguments(cmd.inputs, None, sub_configs=False)
    if cmd.config is not None:
        parser.add_class_arguments(cmd.config, cmd.section, sub_configs=False)
    if cmd.extend is not None:
        cmd.extend(parser)
    return parser


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines)


def _friendly(cmd: Command, message: str) -> str:
    """jsonargparse's messages about unknown keys, in the words of a config file's reader."""
    import re

    flags = known_flags(cmd)
    match = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    if match:
        group, key = match.groups()
        known = sorted({k[len(group) + 1:].split(".")[0] for k in flags if k.startswith(group + ".")})
        return f"unknown config key '{group}.{key}' (known: {', '.join(known)})"
    match = re.search(r"^Option '([\w.]+)' is not accepted", message)
    if match:
        known = sorted({k.split(".")[0] for k in flags})
        return f"unknown config key '{match.group(1)}' (known: {', '.join(known)})"
    match = re.search(r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)$', message)
    if match:
        key, choices, value = match.groups()
        return f"--{key} must be one of {choices.replace(chr(39), '')}; got {value!r}"
    match = re.search(r"unrecognized arguments: (\S+)", message)
    if match:
        return f"unknown option {match.group(1)} (`refusal-sae {cmd.name} --help` lists the options)"
    return message


def parse(cmd: Command, argv: Sequence[str]) -> tuple[Any, Any, dict[str, Any]]:
    """`(config object or None, inputs object, extras)` from the command line; bad input raises ValueError."""
    from jsonargparse import ArgumentError

    argv = resolve_config_names(translate_argv(cmd, argv))
    check_config_file(cmd, argv)
    parser = build_parser(cmd)
    try:
        namespace = parser.parse_args(argv)
    except ArgumentError as exc:
        raise ValueError(_friendly(cmd, _one_line(exc))) from None
    resolved = f"# resolved config of refusal-sae {cmd.name}\n{parser.dump(namespace, skip_unset=False)}"
    instances = parser.instantiate(namespace)
    data = instances.as_dict() if hasattr(instances, "as_dict") else dict(vars(instances))
    data.pop("config", None)
    input_names = [f.name for f in dataclasses.fields(cmd.inputs)]
    inputs = cmd.inputs(**{name: data.pop(name) for name in input_names if name in data})
    if cmd.config is None:
        cfg = None
    elif cmd.section:
        cfg = data.pop(cmd.section)
    else:
        names = [f.name for f in dataclasses.fields(cmd.config)]
        cfg = cmd.config(**{name: data.pop(name) for name in names})
    data["_resolved"] = resolved
    return cfg, inputs, data


def record_config(inputs: Any, resolved: str) -> Path | None:
    """Write the resolved config beside the command's output: `OUT/config.yaml` for an output folder,
    `OUT.config.yaml` for an output file; None when the command has no `out`."""
    from activations.io import write_text_atomic

    out = getattr(inputs, "out", None)
    if out is None:
        return None
    out = Path(out)
    target = out / "config.yaml" if out.is_dir() else out.with_name(out.name + ".config.yaml")
    return write_text_atomic(target, resolved)


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".html", ".yaml", ".txt")
"""An `--out` with one of these suffixes is a file; any other is a folder."""


def check_output(out: Path) -> None:
    """Stop before any work when `--out` cannot be written: a file where a folder goes, or a place
    this process may not write (probed by creating and removing a temporary file)."""
    import tempfile

    folder = out.parent if out.suffix.lower() in FILE_SUFFIXES else out
    ancestor = next(p for p in (folder, *folder.parents) if p.exists())
    if not ancestor.is_dir():
        where = "is an existing file" if ancestor == out else f"lies inside {ancestor}, which is a file"
        raise NotADirectoryError(f"output {'folder ' if folder == out else 'file '}{out} {where}; pass another --out")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(folder)) from None


def run_command(cmd: Command, argv: Sequence[str] | None = None) -> int:
    """Parse, run and show one command; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, inputs, extras = parse(cmd, argv)
        resolved = extras.pop("_resolved")
        if getattr(inputs, "out", None) is not None:
            check_output(Path(inputs.out))
        result = cmd.run(cfg, inputs, **extras)
        record_config(inputs, resolved)
    except SystemExit as exc:  # --help / --print_config
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except BAD_INPUT as exc:
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return 2
    cmd.show(inputs, result)
    return 0
