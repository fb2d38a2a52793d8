"""Time notebook 00 end to end on this machine and report its peak memory and quality figures.

Runs the notebook headless through papermill with ``rebuild=True`` into a separate profile
folder (``outputs/bench-<profile>/``) so the demo's outputs are untouched.
Targets (issue 2): at most 12 minutes on 2 cores for both tiny bases, peak memory under 4 GB.

    .venv/bin/python benchmarks/prepare.py [--profile tiny] [--overrides JSON]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--kernel", default="zerosearch")
    ap.add_argument("--overrides", default="{}", help='JSON, e.g. \'{"tiny.policy_steps": 50}\' for a smoke run')
    args = ap.parse_args()
    name = f"bench-{args.profile}"
    out_dir = ROOT / "outputs" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "00_prepare.ipynb"
    overrides = {**json.loads(args.overrides), "name": name}
    params = json.dumps({"profile": args.profile, "overrides": overrides, "rebuild": True})
    start = time.time()
    subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "00_prepare.ipynb"), str(executed),
                    "-k", args.kernel, "-y", params, "--cwd", str(ROOT / "notebooks")], check=True)
    total = time.time() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB

    nb = json.loads(executed.read_text())
    print(f"\n{'notebook 00 cell':58s} {'seconds':>8s}")
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = [line for line in "".join(cell["source"]).splitlines() if line.strip() and not line.startswith(("import", "from"))]
        print(f"{lines[0][:58] if lines else '':58s} {cell['metadata']['papermill']['duration']:8.1f}")
    def log(name):
        return [json.loads(line) for line in (out_dir / "models" / f"{name}.loss.jsonl").read_text().splitlines()]

    # Each base's log starts with its copy warm-up (the two warm-ups differ: see pretraining.build_bases).
    print(f"\n{'what':40s} {'value':>10s} {'target':>10s}")
    print(f"{'whole notebook (min)':40s} {total / 60:10.2f} {'':>10s}")
    pretraining = sum(log(m)[-1]["seconds"] for m in ("simulator-base", "policy-base"))
    print(f"{'pretraining both bases (min)':40s} {pretraining / 60:10.2f} {'<= 12':>10s}")
    for m in ("simulator-base", "policy-base"):
        rows = log(m)
        warm = [r for r in rows if r["phase"] == "copy warm-up"][-1]
        secs, tokens = rows[-1]["seconds"] - warm["seconds"], rows[-1]["tokens"] - warm["tokens"]
        print(f"{'  ' + m + ' warm-up (min, steps)':40s} {warm['seconds'] / 60:10.2f} {warm['step']:>6d}")
        print(f"{'  ' + m + ' after it (min, steps, tokens/s)':40s} {secs / 60:10.2f} {rows[-1]['step'] - warm['step']:>6d} "
              f"{tokens / secs:8.0f}")
    print(f"{'peak memory, kernel (GB)':40s} {peak_gb:10.2f} {'< 4':>10s}")
    quality = json.loads((out_dir / "models" / "policy-base.eval.json").read_text())
    print(f"\n{'policy base, 1-hop test':22s} {'EM':>6s} {'F1':>6s} {'well-formed':>12s} {'searches/q':>11s} {'n':>5s}")
    for key, r in quality["settings"].items():
        print(f"{key:22s} {r['em']:6.3f} {r['f1']:6.3f} {r['well_formed_first_action']:12.3f} "
              f"{r['searches_per_question']:11.2f} {r['n']:5d}")


if __name__ == "__main__":
    main()
