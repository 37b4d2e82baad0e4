"""Each stage's options live in one Config dataclass: its command's `--<section>.*` flags and the
pipeline YAML's `<section>:` block are that dataclass, defaults included."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from analysis.pipeline.config import PipelineConfig
from analysis.pipeline.main import COMMAND as PIPELINE
from analysis.pipeline.main import load_config
from analysis.stages import harvest, refusal_tokens, select, stability, train, vectors
from analysis.stages.analyze import Config as AnalyzeConfig
from analysis.stages.command import build_parser, flag_kinds

STAGE_COMMANDS = {
    "harvest": harvest.COMMAND, "train": train.COMMAND, "select": select.COMMAND, "vectors": vectors.COMMAND,
    "refusal_tokens": refusal_tokens.COMMANDS["fit"],
}


def _defaults(parser, section: str) -> dict:
    return parser.get_defaults()[section].as_dict()


@pytest.mark.parametrize("section", list(STAGE_COMMANDS))
def test_command_flags_and_pipeline_section_are_one_dataclass(section):
    command = STAGE_COMMANDS[section]
    assert typing.get_type_hints(PipelineConfig)[section] is command.config  # the same class, not a copy
    flags = flag_kinds(command.config, f"{section}.")
    stage_parser, pipeline_parser = build_parser(command), build_parser(PIPELINE)
    for key in flags:  # every field is a flag of the command and of the pipeline, under one name
        assert stage_parser.get_defaults()[key] == pipeline_parser.get_defaults()[key], key
    expected = dataclasses.asdict(command.config())
    assert _defaults(stage_parser, section) == expected == _defaults(pipeline_parser, section)
    assert dataclasses.asdict(getattr(PipelineConfig(), section)) == expected


def test_analyze_section_extends_the_stability_command():
    assert issubclass(AnalyzeConfig, stability.Config)
    assert {f.name for f in dataclasses.fields(stability.Config)} < {f.name for f in dataclasses.fields(AnalyzeConfig)}


def test_a_default_changed_in_the_dataclass_reaches_the_flag_and_the_pipeline(monkeypatch):
    """Change `harvest.Config.batch_size`'s default in one place: the command's flag default, the
    pipeline's parsed config and a plain `PipelineConfig()` all see the new value."""
    index = [f.name for f in dataclasses.fields(harvest.Config)].index("batch_size")
    defaults = list(harvest.Config.__init__.__defaults__)
    defaults[index] = 7
    monkeypatch.setattr(harvest.Config.__init__, "__defaults__", tuple(defaults))
    monkeypatch.setattr(harvest.Config.__dataclass_fields__["batch_size"], "default", 7)
    assert build_parser(harvest.COMMAND).get_defaults()["harvest.batch_size"] == 7
    assert load_config(None).harvest.batch_size == 7
    assert PipelineConfig().harvest.batch_size == 7
