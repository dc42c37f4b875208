"""A process that has imported torch and Smalti once, and forks a fresh child for every ``smalti`` command a test runs.

Why: about 250 commands of the suite go through the real command line (``conftest.smalti_cli``). In a fresh
interpreter each one spends a second or two importing torch (and transformers, where a command builds a Hugging
Face model) before it does anything, about a sixth of the suite's time on the 2-core build machine. A forked
child starts with those imports done and then runs exactly what ``python -m smalti ARGS`` runs: the entry point
``smalti.cli.main.main`` with the arguments, in its own process, working directory, environment and standard
streams, exiting with the command's code. What a fresh interpreter alone shows (which modules a command imports,
how long it takes to start) is tested in fresh interpreters: ``tests/test_cli_startup.py``, the Makefile tests.

Protocol, one JSON line each way on stdin/stdout: ``{"args", "cwd", "env", "out"}`` in, ``{"pid"}`` out. The
child writes its stdout and stderr to ``out/stdout`` and ``out/stderr`` and, when it ends, its exit code to
``out/rc``; the zygote never waits for children (they are reaped as they exit), so commands may overlap.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _preload() -> None:
    import torch  # noqa: F401

    import smalti.cli.main  # noqa: F401
    import smalti.trainer  # noqa: F401
    import smalti.workflows.forget  # noqa: F401

    try:
        import smalti.models.hf  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        pass


def _child(request: dict) -> None:
    """Become the command: never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(os.path.join(request["out"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command's own subprocesses are its to wait for
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import smalti

        sys.argv = [os.path.join(os.path.dirname(smalti.__file__), "__main__.py"), *request["args"]]
        from smalti.cli.main import main

        try:
            code = main(request["args"])
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
                code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        rc = os.path.join(request["out"], "rc")
        with open(rc + ".tmp", "w") as handle:
            handle.write(str(code))
        os.replace(rc + ".tmp", rc)
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def serve() -> None:
    sys.path[0] = os.getcwd()  # as ``python -m smalti`` run from the repository: its smalti, not this folder's
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they exit
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    serve()
