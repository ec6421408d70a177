# warmstart's launcher for a Python command-line tool (`warmstart record --tool`).
#
#   python3 -c "$(cat py_tool.py)" module MOD -- ARGS...   (the tool's `python3 -m MOD ARGS`)
#   python3 -c "$(cat py_tool.py)" script PATH -- ARGS...  (`python3 PATH ARGS`, console scripts)
#
# It loads what the tool's entry point imports without running the tool, runs the entry
# point once per priming argument list (WARMSTART_TOOL_PRIME, JSON; output to stderr,
# exit intercepted), tells warmstart every file it loaded (WARMSTART_FILE=... lines on
# the notify fd) and that it is warm (READY=1): the snapshot is taken in its read of the
# notify fd. Each restored instance then reads its run's request there (argv, cwd,
# environment, umask), runs the entry point as `python3 -m MOD` / `python3 PATH` would,
# and exits with the tool's status.
import ast
import gc
import json
import os
import runpy
import shlex
import sys
import traceback
import importlib.util


def entry_source(mode, target):
    """(path, source) of the code the tool runs first."""
    if mode == "module":
        spec = importlib.util.find_spec(target)
        if spec is None:
            raise SystemExit(f"warmstart: no module named {target!r}")
        if spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(target + ".__main__")
            if spec is None:
                raise SystemExit(f"warmstart: {target!r} is a package without __main__")
        path = spec.origin
    else:
        path = os.path.abspath(target)
    with open(path, "rb") as f:
        return path, f.read()


def preload(path, source):
    """Runs the top-level imports of the entry code (not the rest of it)."""
    try:
        tree = ast.parse(source, path)
    except SyntaxError:
        return
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    code = compile(ast.Module(body=imports, type_ignores=[]), path, "exec")
    try:
        exec(code, {"__name__": "__warmstart_preload__", "__file__": path})
    except BaseException:
        pass


def run(mode, target, argv):
    """The tool's run with `argv`, as the interpreter would do it; its exit status."""
    sys.argv = list(argv)
    code = 0
    try:
        if mode == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        c = e.code
        if c is None:
            code = 0
        elif isinstance(c, int):
            code = c
        else:
            print(c, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    return code


def read_exact(fd, n):
    out = b""
    while len(out) < n:
        b = os.read(fd, n - len(out))
        if not b:
            raise SystemExit("warmstart: the notify channel closed before the request")
        out += b
    return out


def read_line(fd):
    out = b""
    while not out.endswith(b"\n"):
        b = os.read(fd, 1)
        if not b:
            return out
        out += b
    return out


def main():
    mode, target, sep = sys.argv[1], sys.argv[2], sys.argv[3]
    assert sep == "--" and mode in ("module", "script")
    args = sys.argv[4:]
    fd = int(os.environ.pop("WARMSTART_NOTIFY_FD"))
    os.environ.pop("NOTIFY_SOCKET", None)
    primes = json.loads(os.environ.pop("WARMSTART_TOOL_PRIME", "[]"))
    path, source = entry_source(mode, target)
    # sys.path[0] as the interpreter sets it for the tool, not this launcher's directory.
    if mode == "module":
        sys.path[0] = os.getcwd()
        argv0 = path
    else:
        sys.path[0] = os.path.dirname(path)
        argv0 = target
    preload(path, source)
    for p in primes:
        out = os.dup(1)
        os.dup2(2, 1)
        try:
            code = run(mode, target, [argv0] + shlex.split(p))
        finally:
            sys.stdout.flush()
            os.dup2(out, 1)
            os.close(out)
        print(f"warmstart: primed with {p!r}: exit status {code}", file=sys.stderr)
    files = {path}
    files.update(
        getattr(m, "__file__", None) for m in list(sys.modules.values())
    )
    files.discard(None)
    msg = b"".join(
        b"WARMSTART_FILE=" + os.fsencode(os.path.abspath(f)) + b"\n"
        for f in sorted(files)
        if os.path.isfile(f) and "\n" not in f
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # What the tool loaded is there for good: the collector leaves it alone from here on
    # (gc.freeze, as before a fork), so no collection in a run, and none as the
    # interpreter exits (most of a cold exit's time), walks every object the snapshot
    # holds. A run's own objects are collected as in a cold run; objects of the snapshot
    # are freed at exit as in a cold run, but a reference cycle among them is never
    # collected (Python does not promise to finalize what is alive at exit anyway).
    gc.collect()
    gc.freeze()
    os.write(fd, msg + b"READY=1\n")
    # The snapshot is taken in this read.
    reply = read_line(fd)
    if not reply.startswith(b"RESTORED=1"):
        # Left running after the record: run once with the recorded arguments.
        sys.exit(run(mode, target, [argv0] + args))
    head = read_line(fd)
    if not head.startswith(b"TOOL "):
        raise SystemExit(f"warmstart: unexpected request {head[:40]!r}")
    req = json.loads(read_exact(fd, int(head[5:])))
    os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.umask(req["umask"])
    if mode == "module":
        sys.path[0] = os.getcwd()
    sys.exit(run(mode, target, [argv0] + req["args"]))


main()
