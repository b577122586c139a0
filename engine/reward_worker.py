"""The reward worker: a process that runs a user's reward, so that a call past its time limit can be stopped.

Run as a script by engine/reward_calls.py (`python reward_worker.py`), never imported: it uses the
standard library only, so it starts in tens of milliseconds and holds no copy of torch. Messages are
pickles, the parent's on stdin and the worker's on the stdout it had at start (anything the reward
prints goes to stderr):

    parent: ("init", sys.path, pickled reward)      worker: ("ready",) or ("init_error", text)
    parent: ("call", [(prompt, completion, reference), ...])
    worker, after each call in turn: ("ok", float) | ("raised", text) | ("not a number", text)

The worker exits when its stdin closes (the parent stopped); terminal signals do not reach it (the
parent starts it in a session of its own and stops it by its process id).
"""

import os
import sys

if __name__ == "__main__" and sys.path and \
        os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # this folder (engine/) is no package root: its modules must not shadow anything

import numbers  # noqa: E402
import pickle  # noqa: E402
import traceback  # noqa: E402


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _one(fn, args) -> tuple:
    try:
        value = fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the parent with the example and the copy
        return ("raised", f"{type(e).__name__}: {e}{_where(e)}")
    if not isinstance(value, numbers.Real):
        return ("not a number", f"a {type(value).__name__} ({repr(value)[:60]})")
    try:
        return ("ok", float(value))
    except Exception as e:  # noqa: BLE001 - a Real whose float() fails
        return ("not a number", f"a {type(value).__name__} whose float() raised {type(e).__name__}")


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the protocol's channel; fd 1 and sys.stdout become stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer

    def send(msg) -> None:
        pickle.dump(msg, out)
        out.flush()

    try:
        _, path, blob = pickle.load(inp)
    except EOFError:
        return
    sys.path[:] = path
    try:
        fn = pickle.loads(blob)
    except Exception as e:  # noqa: BLE001 - the parent refuses the reward with this text
        send(("init_error", f"{type(e).__name__}: {e}"))
        return
    send(("ready",))
    while True:
        try:
            _, calls = pickle.load(inp)
        except EOFError:
            return
        for args in calls:
            send(_one(fn, args))


if __name__ == "__main__":
    main()
