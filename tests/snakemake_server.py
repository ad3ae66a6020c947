"""A fork server for `python -m snakemake` in the tests: started once per pytest worker, it imports Snakemake (with
its plug-ins) and torch, then forks a child per command, which runs Snakemake's `__main__` exactly as
`python -m snakemake ARGS` would in a fresh interpreter: the command's working directory, environment, `sys.path`
(that directory, then PYTHONPATH, then the interpreter's own) and `sys.argv`, its output into the files it is
given. Nothing of the project is imported here, so each child imports the checkout it runs in (a test's copy, with
its own edits), as a fresh interpreter would.

Why: each Snakemake command of the suite otherwise spends about 2.5 s of its 4-5 s importing the same Snakemake and
torch (the workflow's parse imports gtmoe, which imports torch); the suite runs a few hundred of them.

Protocol (one line of JSON each way, on stdin and stdout): a request {"args", "cwd", "env", "stdout", "stderr"}
is answered by {"pid": PID} as the child starts and {"returncode": N} when it ends (-N for a signal N).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile

import snakemake

BASE_PATH = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]


def child(request: dict) -> None:
    """Become `python -m snakemake ARGS` in the request's directory and environment; never returns."""
    code = 1
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):  # first: any error below goes there
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # read TMPDIR again, as a fresh interpreter does
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *BASE_PATH]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = [os.path.join(os.path.dirname(snakemake.__file__), "__main__.py"), *request["args"]]
        runpy.run_module("snakemake", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # as the interpreter would: the traceback on stderr, exit 1
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    requests, replies = sys.stdin, sys.stdout
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    import snakemake.api  # noqa: F401
    import snakemake.cli  # noqa: F401
    import torch  # noqa: F401  (what every parse of the workflow imports)
    from snakemake.scheduling import job_scheduler  # noqa: F401  (it collects the executor plug-ins)

    main()
