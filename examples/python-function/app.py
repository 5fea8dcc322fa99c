"""An example Lambda function for `thaw function build` (see README.md).

It greets, proves its one dependency (tabulate) imports, and counts SnapStart hooks; other
actions exist for Thaw's integration tests: sleeping, reading entropy and clocks (which must
differ between clones of one snapshot), reading /proc/interrupts, failing, hanging and crashing.
"""

import os
import time

from snapshot_restore_py import register_after_restore, register_before_snapshot
from tabulate import tabulate

STATE = {"before_snapshot_ran": False, "restores": 0}

print("app: init", flush=True)


def before_snapshot():
    STATE["before_snapshot_ran"] = True
    print("app: before-snapshot hook", flush=True)


def after_restore():
    STATE["restores"] += 1
    print("app: after-restore hook #%d" % STATE["restores"], flush=True)


register_before_snapshot(before_snapshot)
register_after_restore(after_restore)


def handler(event, context):
    action = event.get("action") if isinstance(event, dict) else None
    print("app: invocation %s action=%s" % (context.aws_request_id, action), flush=True)
    if action == "sleep":
        start = time.monotonic()
        time.sleep(float(event["seconds"]))
        return {"slept": time.monotonic() - start}
    if action == "entropy":
        with open("/dev/urandom", "rb") as f:
            dev_urandom = f.read(32).hex()
        return {
            "dev_urandom": dev_urandom,
            "os_urandom": os.urandom(32).hex(),
            "time": time.time(),
            "monotonic": time.monotonic(),
        }
    if action == "interrupts":
        with open("/proc/interrupts") as f:
            return {"interrupts": f.read()}
    if action == "fail":
        raise RuntimeError("the handler failed on purpose")
    if action == "hang":
        while True:
            time.sleep(3600)
    if action == "crash":
        os._exit(3)
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {
        "greeting": "Hello, %s!" % name,
        "dependency": tabulate([[name, len(name)]], headers=["name", "length"]),
        "restores": STATE["restores"],
        "before_snapshot_ran": STATE["before_snapshot_ran"],
    }
