"""Kill-and-resume on any main.py command: does a SIGKILLed run, rerun with the same
command, end with the numbers of an uninterrupted run?

    python -m benchmarks.resume_check --kill_after 3 --out DIR -- <main.py flags>

Runs the command twice into DIR/whole (uninterrupted) and DIR/resumed (SIGKILLed once
`--kill_after` rounds are logged, then rerun to the end), and prints, round by round,
whether every logged number except wall-clock timings is equal.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Fields that describe the work done, not its results: wall and CPU time, memory, and how
# many clients were scored (a resumed run scores everyone once, its reuse cache is new).
TIMING = frozenset({"seconds", "train_seconds", "eval_seconds", "cpu_seconds", "peak_rss_mb",
                    "clients_scored"})


def command(flags: list[str], out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *flags, "-o", str(out)]


def environment() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def logged_rounds(out: Path) -> list[dict]:
    """metrics.jsonl without the `TIMING` fields (they differ between any two runs)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in TIMING} for x in lines]


def kill_after_rounds(cmd: list[str], out: Path, rounds: int, timeout: float = 300.0,
                      quiet: bool = True) -> int:
    """Starts `cmd` and SIGKILLs it once `rounds` rounds are in out/metrics.jsonl;
    returns how many were logged when it died."""
    sink = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=sink, stderr=sink)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rounds:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill_after", type=int, default=3, help="rounds logged before SIGKILL")
    p.add_argument("--out", required=True, help="folder for the two run directories")
    p.add_argument("--timeout", type=float, default=6 * 3600)
    p.add_argument("flags", nargs=argparse.REMAINDER, help="main.py flags (after --)")
    args = p.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    out = Path(args.out)
    if (out / "whole").exists() or (out / "resumed").exists():
        sys.exit(f"error: {out} already holds whole/ or resumed/; choose an empty --out")

    t0 = time.perf_counter()
    done = subprocess.run(command(flags, out / "whole"), cwd=ROOT, env=environment())
    if done.returncode:
        sys.exit(f"error: the uninterrupted run failed (exit code {done.returncode})")
    t1 = time.perf_counter()
    logged = kill_after_rounds(command(flags, out / "resumed"), out / "resumed",
                               args.kill_after, args.timeout, quiet=False)
    print(f"\nkilled with SIGKILL after {logged} logged round(s); rerunning the same command",
          flush=True)
    again = subprocess.run(command(flags, out / "resumed"), cwd=ROOT, env=environment())
    if again.returncode:
        sys.exit(f"error: the resumed run failed (exit code {again.returncode})")
    t2 = time.perf_counter()

    whole, resumed = logged_rounds(out / "whole"), logged_rounds(out / "resumed")
    print(f"\nuninterrupted {t1 - t0:.0f} s; killed + resumed {t2 - t1:.0f} s")
    print("round  test_acc (whole)  test_acc (resumed)  all logged numbers equal")
    for w, r in zip(whole, resumed, strict=False):
        side = "before kill" if w["round"] < logged else "after resume"
        print(f"{w['round']:5d}  {w['test_acc']:.6f}          {r['test_acc']:.6f}            "
              f"{'yes' if w == r else 'NO'}  ({side})")
    same = whole == resumed
    print(f"{len(whole)} rounds uninterrupted, {len(resumed)} after resume: "
          f"{'identical' if same else 'DIFFERENT'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
