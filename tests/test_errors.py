"""A library UserError names the config field ("exclude_layers = '99': ..."); the command line shows the same
error with the flag ("--exclude-layers 99: ..."), one line, exit 2."""

from __future__ import annotations

import pickle

import pytest

from jaxprune.cli import main
from jaxprune.commands.flags import error_line
from jaxprune.errors import UserError
from jaxprune.evaluate import parse_dataset_spec
from jaxprune.meshes import ShardingRules, parse_mesh
from jaxprune.pretrain.switchlora import SwitchSchedule
from jaxprune.prune.groups import prunable_layers
from jaxprune.prune.select import resolve_sparsity


def _raised(fn, *args, **kwargs) -> UserError:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return e.value


@pytest.mark.parametrize("call, library, command_line", [
    (lambda: prunable_layers(2, "99"),
     "exclude_layers = '99': layer 99 out of range 0..1", "--exclude-layers 99: layer 99 out of range 0..1"),
    (lambda: parse_mesh("data=2,model=4", 8),
     "mesh = 'data=2,model=4': unknown axis 'model'", "--mesh data=2,model=4: unknown axis 'model'"),
    (lambda: ShardingRules.from_strings(["embed=model"]),
     "axis_rules = 'embed=model': unknown mesh axis 'model'", "--axis-rule embed=model: unknown mesh axis 'model'"),
    (lambda: resolve_sparsity(0.3, (2, 4)),  # another field named inside the message
     "sparsity = 0.3: contradicts pattern 2:4 (which means sparsity 0.5); drop sparsity or make them agree",
     "--sparsity 0.3: contradicts --pattern 2:4 (which means sparsity 0.5); drop --sparsity or make them agree"),
    (lambda: SwitchSchedule(steps=10, interval=4, freeze_steps=3),  # a field whose flag differs, no head
     "interval 4 must be >= 2 x freeze_steps (3)", "--switch-interval 4 must be >= 2 x --switch-freeze-steps (3)"),
])
def test_library_names_the_field_and_the_command_line_the_flag(call, library, command_line):
    e = _raised(call)
    assert str(e).startswith(library) and "--" not in str(e), str(e)
    assert error_line(e).startswith(command_line), error_line(e)
    again = pickle.loads(pickle.dumps(e))  # field and value survive (a worker's error re-raised)
    assert (str(again), error_line(again)) == (str(e), error_line(e))


def test_a_value_a_shell_would_split_is_quoted_on_the_command_line():
    e = _raised(prunable_layers, 4, "1, x")
    assert str(e).startswith("exclude_layers = '1, x': expected comma-separated integers")
    assert error_line(e).startswith("--exclude-layers '1, x': expected comma-separated integers")


@pytest.mark.parametrize("argv, line", [
    (["eval", "nowhere", "--dataset", "a:b:c:d"],
     "jaxprune eval: error: --dataset a:b:c:d: expected NAME[:CONFIG][:SPLIT]"),
    (["finetune", "nowhere", "--text", "t.txt", "--out", "never", "--mesh", "data=2,model=4"],
     "jaxprune finetune: error: --mesh data=2,model=4: unknown axis 'model' (axes: data, fsdp, tensor)"),
])
def test_the_cli_prints_the_flag(argv, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert str(_raised(parse_dataset_spec, "a:b:c:d")) == "dataset = 'a:b:c:d': expected NAME[:CONFIG][:SPLIT]"
    assert not (tmp_path / "never").exists()
