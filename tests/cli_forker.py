"""Forks ``python run.py`` processes from one that has imported the job's modules (``jobs_helpers.PreloadedCli``).

Run as a script from the repository root, with the environment of ``jobs_helpers.cli_env``. It imports
the modules a generation job loads (torch and transformers take most of a short CLI run's time),
starts no thread and runs nothing else. On stdin it reads one JSON request per line: ``id``, ``args``,
``module`` (null for run.py, else what ``python -m`` would run), ``env`` (the child's whole
environment), ``out`` and ``err`` (files for its stdout and stderr). For each it forks a child that
runs the script or module as ``__main__`` and exits as ``python run.py`` would (an uncaught exception
prints its traceback and exits 1), and writes ``started <id> <pid>`` to stdout; once the child has
exited, ``exited <pid> <returncode>`` (``-N`` when killed by signal N).
"""

from __future__ import annotations

import json
import os
import runpy
import select
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # as for ``python run.py``

import hydra  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

import engine.build  # noqa: E402, F401
import jobs.cli  # noqa: E402, F401
import jobs.distill  # noqa: E402, F401
import jobs.generate  # noqa: E402, F401
import jobs.openai_batch  # noqa: E402, F401
import jobs.score  # noqa: E402, F401
import jobs.synthetic_data  # noqa: E402, F401


def run_child(request: dict) -> None:
    """In the forked child: run run.py (or the module) with the request's arguments, environment and output files."""
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if request["module"] is None:
        sys.argv = ["run.py", *request["args"]]
        runpy.run_path(os.path.join(ROOT, "run.py"), run_name="__main__")
    else:
        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    assert threading.active_count() == 1, "a forking process must hold no other thread"
    children: set[int] = set()
    pending = b""
    stdin_open = True
    while stdin_open or children:
        readable = select.select([0] if stdin_open else [], [], [], 0.02)[0]
        if readable:
            data = os.read(0, 65536)
            stdin_open = bool(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_child(request)  # never returns: the child's interpreter exits from there
                children.add(pid)
                report(f"started {request['id']} {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            report(f"exited {pid} {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    main()
