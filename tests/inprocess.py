"""Running a script's main() inside the test process, as `python SCRIPT ARGS` would, but without
starting Python and importing torch again: for checks that stop early or run a few seconds."""
import sys

import pytest

import data
import distributed
import output
from conftest import own_signal_handlers
from model import CheckpointError


def run_main(module, args, capsys, monkeypatch):
    """module.main() under distributed.run with sys.argv = [SCRIPT, *args] -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, args)])
    with own_signal_handlers(), pytest.raises(SystemExit) as e:  # pretrain.py sets its own
        distributed.run(module.main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def error_lines(err, script):
    """The `SCRIPT.py: error:` lines of stderr (script: the module's name)."""
    return [line for line in err.splitlines() if line.startswith(f"{script}.py: error:")]
