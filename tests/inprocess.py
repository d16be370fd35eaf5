"""Running a script's main() inside the test process, as `python SCRIPT ARGS` would, but without
starting Python and importing torch again: for checks that stop early or run a few seconds."""
import signal
import sys

import pytest

import data
import distributed
import output
from model import CheckpointError


def run_main(module, args, capsys, monkeypatch):
    """module.main() under distributed.run with sys.argv = [SCRIPT, *args] -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, args)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # pretrain.py sets its own
    try:
        with pytest.raises(SystemExit) as e:
            distributed.run(module.main, (data.DataError, CheckpointError, output.WriteError), data.error_text)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def error_lines(err, script):
    """The `SCRIPT.py: error:` lines of stderr (script: the module's name)."""
    return [line for line in err.splitlines() if line.startswith(f"{script}.py: error:")]
