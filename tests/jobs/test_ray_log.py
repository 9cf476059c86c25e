"""`jobs.ray_log.diverted` in a real process whose stderr is a pipe: what Ray writes there (C++ straight to
descriptor 2, Python loggers and print through sys.stdout and sys.stderr) lands in the log file, mmembed's own
lines on the original stderr, and everything is as before once the block ends."""

from __future__ import annotations

import subprocess
import sys

DIVERTED = """
import logging, os, sys
from jobs.ray_log import diverted
logging.basicConfig()  # a handler holding sys.stderr, as Ray's loggers hold it
with diverted(sys.argv[1]) as console:
    os.write(2, b"[E core_worker.cc:2465] from C++, on the descriptor\\n")
    logging.getLogger("ray").warning("from a Python logger")
    print("to stdout, as Ray's error listener prints")
    print("job 1: 3 embedded", file=console)
print("after, on stdout")
print("after, on stderr", file=sys.stderr)
"""


def test_ray_output_goes_to_the_log_and_mmembed_lines_to_stderr(tmp_path):
    log = tmp_path / "logs" / "job.log"
    run = subprocess.run([sys.executable, "-c", DIVERTED, str(log)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["job 1: 3 embedded", "after, on stderr"]
    assert run.stdout.splitlines() == ["after, on stdout"]
    assert log.read_text().splitlines() == [
        "[E core_worker.cc:2465] from C++, on the descriptor",
        "WARNING:ray:from a Python logger",
        "to stdout, as Ray's error listener prints",
    ]


def test_verbose_diverts_nothing(capsys):
    from jobs.ray_log import diverted

    with diverted(None) as console:
        print("mine", file=console)
    assert capsys.readouterr().err == "mine\n"
