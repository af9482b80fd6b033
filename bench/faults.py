"""Scripted fault checks too slow for the test suite: dead and hung ranks, 2 and 4 ranks, under
torchrun and the deepspeed launcher.  Each job must exit non-zero within a bound:

* SIGKILL (a dead rank): its peers' collectives fail at once (connection reset), and the
  launcher kills the rest; seconds.
* SIGSTOP (a hung rank, alive but silent): the peers wait for ``--distributed-timeout-minutes``,
  fail, and the launcher then stops the hung one (torchrun and the deepspeed launcher both send
  SIGTERM, then SIGKILL after 30 s): bound = timeout + ~30 s + start-up of the failure.

    python bench/faults.py --data /tmp/dd            # all 8 cases, ~10 min on 2 busy cores
    python bench/faults.py --data /tmp/dd --ranks 4 --signals KILL

``--data`` holds tok.model and pool_text_document.{bin,idx} (``make demo``'s data or /tmp/dd).
Prints one JSON line per case, then a summary JSON line.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_faults import (assert_job_gone, deepspeed_launcher, kill_rank_mid_run,  # noqa: E402
                         torchrun, train_flags)

LAUNCHERS = {"torchrun": torchrun, "deepspeed": deepspeed_launcher}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--signals", nargs="+", default=["KILL", "STOP"], choices=["KILL", "STOP"])
    parser.add_argument("--timeout-minutes", type=float, default=0.25)
    args = parser.parse_args()
    data = SimpleNamespace(tokenizer_model=os.path.join(args.data, "tok.model"),
                           pool_prefix=os.path.join(args.data, "pool_text_document"))
    results = []
    for ranks in args.ranks:
        for launcher in args.launchers:
            for name in args.signals:
                with tempfile.TemporaryDirectory() as workdir:
                    flags = train_flags(data, workdir, "--save", os.path.join(workdir, "ckpt"),
                                        "--save-interval", "5", "--distributed-timeout-minutes",
                                        str(args.timeout_minutes))
                    started = time.monotonic()
                    outcome = kill_rank_mid_run(LAUNCHERS[launcher](ranks), flags,
                                                os.path.join(workdir, "log.jsonl"), 6,
                                                rank=ranks - 1, sig=getattr(signal, "SIG" + name))
                    assert_job_gone(outcome)
                    result = {"ranks": ranks, "launcher": launcher, "signal": name,
                              "returncode": outcome["returncode"],
                              "exit_after_signal_s": round(outcome["exit_s"], 1),
                              "timeout_s": args.timeout_minutes * 60,
                              "job_s": round(time.monotonic() - started, 1)}
                print(json.dumps(result), flush=True)
                results.append(result)
    print(json.dumps({"cases": len(results),
                      "all_exited_nonzero": all(r["returncode"] != 0 for r in results),
                      "max_exit_after_kill_s": max((r["exit_after_signal_s"] for r in results
                                                    if r["signal"] == "KILL"), default=None),
                      "max_exit_after_stop_s": max((r["exit_after_signal_s"] for r in results
                                                    if r["signal"] == "STOP"), default=None)}))


if __name__ == "__main__":
    main()
