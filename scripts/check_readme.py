"""Re-run every offline command quoted in README.md / RESULTS.md and check that its output matches.

A quoted result is a fenced block that starts with a command line:

    ```text
    $ python memvp.py
    <lines copied verbatim from what the command printed>
    ```

The quoted lines must appear, in order and contiguous, in the command's output (stdout + stderr),
token by token, and the command must exit with 0. Machine measurements are exempt: a token that is a
number glued to `s` (seconds, `41.2s`) or `x` (a speed ratio, `3.81x`) matches any such token. Everything
else must be identical.

A command that needs what the repository does not hold (real weights, a GPU) ends with `  # needs: <what>`:

    $ python memvp.py --model /tmp/smollm2  # needs: the SmolLM2 weights (see above)

Such blocks are listed as skipped, not run. Commands run one after another with this Python
(sys.executable) in a scratch copy of the repository (so `runs/` starts empty and the repository is not
touched), sharing one cache folder ($VLPEFT_CACHE, default: the repository's cache/).

  python scripts/check_readme.py                 # run every quoted command, compare, report
  python scripts/check_readme.py --list          # only list the quoted commands
  python scripts/check_readme.py --logs DIR      # keep each command's output in DIR (re-used with --reuse)
  python scripts/check_readme.py --keep          # keep the scratch copy and the runs/ it wrote
  python scripts/check_readme.py --only rlp.py   # only the commands of one script
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASUREMENT = re.compile(r"^[(\[]?\d+(?:\.\d+)?[sx][)\],;]?$")
FENCE = re.compile(r"^```text\n\$ (?P<cmd>[^\n]+)\n(?P<body>.*?)^```", re.M | re.S)
NEEDS = re.compile(r"\s+# needs: (?P<what>.+)$")
EXIT = re.compile(r"^\[exit code (?P<code>-?\d+)\]$", re.M)


def quoted_blocks(paths) -> list[tuple[str, str, list[str]]]:
    """[(file, command, expected lines)] for every ```text block that starts with '$ '."""
    out = []
    for p in paths:
        for m in FENCE.finditer(Path(p).read_text()):
            lines = [ln.rstrip() for ln in m["body"].splitlines()]
            out.append((Path(p).name, m["cmd"].strip(), [ln for ln in lines if ln.strip()]))
    return out


def same_line(expected: str, got: str) -> bool:
    a, b = expected.split(), got.split()
    return len(a) == len(b) and all(x == y or (MEASUREMENT.match(x) and MEASUREMENT.match(y))
                                    for x, y in zip(a, b))


def find_excerpt(expected: list[str], output: list[str]) -> bool:
    """True when `expected` appears contiguously in `output` (blank lines of the output ignored)."""
    output = [ln.rstrip() for ln in output if ln.strip()]
    n = len(expected)
    return any(all(same_line(e, o) for e, o in zip(expected, output[i:i + n]))
               for i in range(len(output) - n + 1))


def needs(cmd: str) -> str:
    """What a quoted command needs that the repository does not hold ("" when it runs here)."""
    m = NEEDS.search(cmd)
    return m["what"].strip() if m else ""


def with_this_python(cmd: str) -> str:
    """The command with `python` (after any VAR=value prefixes) replaced by this interpreter."""
    return re.sub(r"^((?:\w+=\S*\s+)*)python(?=\s)", lambda m: m[1] + shlex.quote(sys.executable), cmd)


def run_command(cmd: str, workdir: Path, env: dict) -> tuple[str, float]:
    """(stdout + stderr, ending in "[exit code N]" when it is not 0; seconds)."""
    t0 = time.time()
    proc = subprocess.run(with_this_python(cmd), shell=True, cwd=workdir, env=env, capture_output=True,
                          text=True)
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        text += f"\n[exit code {proc.returncode}]"
    return text, time.time() - t0


def scratch_copy() -> Path:
    """The tracked files of the repository (as they are in the working tree) in a temporary folder."""
    dst = Path(tempfile.mkdtemp(prefix="vlpeft-readme-"))
    ls = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    files = ls.stdout.split()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    docs = [p for p in ("README.md", "RESULTS.md") if (REPO / p).exists()]
    ap.add_argument("files", nargs="*", default=docs)
    ap.add_argument("--list", action="store_true", help="list the quoted commands and exit")
    ap.add_argument("--logs", default=None, help="folder for each command's output")
    ap.add_argument("--reuse", action="store_true", help="compare against the outputs already in --logs")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (and its runs/) afterwards")
    ap.add_argument("--only", default=None, help="only the commands that contain this text, e.g. memvp.py")
    a = ap.parse_args(argv)
    blocks = [b for b in quoted_blocks([REPO / f for f in a.files]) if a.only is None or a.only in b[1]]
    skipped = [b for b in blocks if needs(b[1])]
    blocks = [b for b in blocks if not needs(b[1])]
    commands = list(dict.fromkeys(cmd for _, cmd, _ in blocks))
    if a.list:
        print("\n".join(commands + [f"skipped: {cmd}" for _, cmd, _ in skipped]))
        return 0
    logs = Path(a.logs or tempfile.mkdtemp(prefix="vlpeft-readme-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLPEFT_CACHE=os.environ.get("VLPEFT_CACHE", str(REPO / "cache")),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    work = None if a.reuse else scratch_copy()
    outputs, t_all = {}, time.time()
    for i, cmd in enumerate(commands):
        log = logs / f"{i:02d}.log"
        if a.reuse:
            outputs[cmd] = log.read_text()
            continue
        print(f"[{i + 1}/{len(commands)}] $ {cmd}", flush=True)
        text, secs = run_command(cmd, work, env)
        log.write_text(f"$ {cmd}\n{text}")
        outputs[cmd] = text
        print(f"    {secs / 60:.1f} min", flush=True)
    failed = 0
    for fname, cmd, expected in blocks:
        exit_code, found = EXIT.search(outputs[cmd]), find_excerpt(expected, outputs[cmd].splitlines())
        failed += exit_code is not None or not found
        print(f"{'ok  ' if found and exit_code is None else 'FAIL'} {fname}: $ {cmd}")
        if exit_code is not None:
            print(f"     the command exited with code {exit_code['code']}")
        if not found:
            print("     expected (not found in the output):\n       " + "\n       ".join(expected))
    for fname, cmd, _ in skipped:
        print(f"skip {fname}: $ {cmd}")
    if work is not None and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif work is not None:
        print(f"scratch copy with its runs/ kept in {work}")
    minutes = (time.time() - t_all) / 60
    print(f"{len(blocks) - failed}/{len(blocks)} quoted results reproduced, {len(skipped)} skipped; "
          f"{len(commands)} commands, {minutes:.1f} min; outputs in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
