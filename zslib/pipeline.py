"""Run the numbered notebooks in order, headless, as one pipeline.

    python -m zslib.pipeline --profile tiny [--from 03] [--to 05] [-p rl.steps=10 ...] [--force]

Each notebook runs through papermill with the profile and the overrides as its parameters; the
executed copy goes to ``outputs/<profile>/notebooks/``. The first notebook that fails stops the run,
with the notebook, the cell and the error printed. A step whose inputs are unchanged since it last
succeeded (its notebook, the resolved profile with the overrides, and the steps before it) is
skipped; ``--force`` runs it anyway. Changes to ``zslib`` itself are not tracked: use ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, load_profile, to_dict
from .files import ROOT, write_text_atomic

NOTEBOOK_DIR = ROOT / "notebooks"
KERNEL = "zerosearch"


class StepFailed(RuntimeError):
    """A notebook stopped with an error: which notebook, which cell, what error."""


@dataclass
class Step:
    number: str          # "00".."05"
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem


def steps(notebook_dir: Path = NOTEBOOK_DIR) -> list[Step]:
    return [Step(p.name[:2], p) for p in sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))]


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are read as YAML (``rl.steps=10`` is an int, ``x=[a, b]`` a list)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {pair!r}: expected key=value, e.g. rl.steps=10")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _select(all_steps: list[Step], start: str | None, stop: str | None) -> list[Step]:
    numbers = [s.number for s in all_steps]
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and value.zfill(2) not in numbers:
            raise ConfigError(f"{flag} {value}: no such notebook (there are {', '.join(numbers)})")
    lo, hi = (start or numbers[0]).zfill(2), (stop or numbers[-1]).zfill(2)
    return [s for s in all_steps if lo <= s.number <= hi]


def step_key(step: Step, profile_dict: dict, overrides: dict, before: str) -> str:
    """What a step's outputs depend on: its notebook, the resolved profile, the overrides, and the
    key of the step before it (so a step that ran again makes every later one run again)."""
    h = hashlib.sha256()
    h.update(step.path.read_bytes())
    h.update(json.dumps(profile_dict, sort_keys=True, default=str).encode())
    h.update(json.dumps(overrides, sort_keys=True, default=str).encode())
    h.update(before.encode())
    return h.hexdigest()


def step_keys(profile_dict: dict, overrides: dict, notebook_dir: Path = NOTEBOOK_DIR) -> list[tuple[Step, str]]:
    """Every step with its ``step_key``, in order."""
    out, before = [], ""
    for step in steps(notebook_dir):
        before = step_key(step, profile_dict, overrides, before)
        out.append((step, before))
    return out


def current_steps(profile: str = "tiny", overrides: dict | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> set[str]:
    """The steps ``run`` would skip: those whose last success had the inputs they have now."""
    overrides = overrides or {}
    P = load_profile(profile, overrides)
    return {step.name for step, key in step_keys(to_dict(P), overrides, notebook_dir) if is_current(P.out, step, key)}


def _stamp_path(out: Path, step: Step) -> Path:
    return out / "pipeline" / f"{step.name}.json"


def is_current(out: Path, step: Step, key: str) -> bool:
    stamp = _stamp_path(out, step)
    executed = out / "notebooks" / step.path.name
    return stamp.exists() and executed.exists() and json.loads(stamp.read_text()).get("key") == key


def _source_cell(executed: Path, index: int) -> int:
    """The failing cell's number in the notebook as written, counting from 1: papermill's index
    counts the cell of injected parameters it adds to the executed copy."""
    try:
        cells = json.loads(executed.read_text())["cells"]
        injected = [i for i, c in enumerate(cells) if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    except (OSError, ValueError, KeyError):
        injected = []
    return index + 1 - sum(i < index for i in injected)


def _failure(step: Step, executed: Path, error) -> StepFailed:
    """A message naming the notebook, the cell (its number, In [n], first lines) and the error."""
    index = getattr(error, "cell_index", None)
    source = (getattr(error, "source", "") or "").strip().splitlines()
    where = f"cell {_source_cell(executed, index)}" if index is not None else "a cell"
    if getattr(error, "exec_count", None) is not None:
        where += f" (In [{error.exec_count}] in the executed copy)"
    lines = [f"notebook {step.name} failed at {where}: {getattr(error, 'ename', type(error).__name__)}: "
             f"{getattr(error, 'evalue', error)}"]
    if source:
        lines.append("the cell begins:\n    " + "\n    ".join(source[:4]))
    lines.append(f"the executed notebook, with the traceback: {executed}")
    return StepFailed("\n".join(lines))


def _local_kernel_manager():
    """A kernel manager whose kernels talk over local IPC sockets (files only this user can open), not
    TCP: nothing listens on a port, and the kernel does not warn at every start that its TCP traffic
    is unencrypted, a warning nobody running the pipeline could act on."""
    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

    return LocalKernelManager


def run_step(step: Step, profile: str, overrides: dict, out: Path, kernel: str, progress: bool = True) -> float:
    """Execute one notebook; returns its seconds. Raises StepFailed."""
    import papermill

    executed = out / "notebooks" / step.path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        papermill.execute_notebook(str(step.path), str(executed), parameters={"profile": profile, "overrides": overrides},
                                   kernel_name=kernel, cwd=str(step.path.parent), progress_bar=progress,
                                   coalesce_streams=True,  # a progress bar's updates leave one line
                                   kernel_manager_class=_local_kernel_manager())
    except Exception as e:  # papermill's PapermillExecutionError carries the cell; anything else is named as it is
        raise _failure(step, executed, e) from None
    return time.time() - start


def run(profile: str = "tiny", start: str | None = None, stop: str | None = None, overrides: dict | None = None,
        force: bool = False, kernel: str = KERNEL, notebook_dir: Path = NOTEBOOK_DIR, out=print) -> list[dict]:
    """Run (or skip) each selected step in order; returns one record per step. Raises StepFailed."""
    overrides = overrides or {}
    P = load_profile(profile, overrides)  # bad overrides fail here, before any notebook starts
    keyed = step_keys(to_dict(P), overrides, notebook_dir)
    chosen = _select([step for step, _ in keyed], start, stop)
    records = []
    for step, key in keyed:
        if step not in chosen:
            continue
        stamp = _stamp_path(P.out, step)
        if not force and is_current(P.out, step, key):
            out(f"{step.name}: current, skipped (--force to run it again)")
            records.append({"step": step.name, "skipped": True, "seconds": 0.0})
            continue
        out(f"{step.name}: running")
        stamp.unlink(missing_ok=True)  # a step that fails halfway is not current
        seconds = run_step(step, profile, overrides, P.out, kernel)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stamp, json.dumps({"key": key, "seconds": round(seconds, 1),
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        out(f"{step.name}: done in {seconds:.0f} s")
        records.append({"step": step.name, "skipped": False, "seconds": seconds})
    return records


def summary(profile: str, overrides: dict | None = None) -> str:
    """Where a run's figures are, and its results table when notebook 05 has made one."""
    P = load_profile(profile, overrides or {})
    lines = [f"outputs: {P.out}", f"executed notebooks: {P.out / 'notebooks'}"]
    figures = sorted((P.out / "figures").glob("*.png")) if (P.out / "figures").is_dir() else []
    lines.append(f"figures ({len(figures)} PNG): {P.out / 'figures'}")
    results = P.out / "eval" / "results.md"
    if results.exists():
        lines += [f"results ({results}):", results.read_text()]
    gaps = P.out / "eval" / "engine_gaps.md"
    if gaps.exists():
        lines += [f"engine against engine ({gaps}):", gaps.read_text()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zslib.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny", help="a name in configs/ or a path to a YAML profile")
    ap.add_argument("--from", dest="start", help="first notebook to run, by number (e.g. 03)")
    ap.add_argument("--to", dest="stop", help="last notebook to run, by number (e.g. 05)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a profile override, e.g. -p rl.steps=10 (repeatable)")
    ap.add_argument("--force", action="store_true", help="run the selected notebooks even when current")
    ap.add_argument("--kernel", default=KERNEL)
    args = ap.parse_args(argv)
    start = time.time()
    try:
        overrides = parse_overrides(args.overrides)
        run(args.profile, args.start, args.stop, overrides, args.force, args.kernel)
    except (ConfigError, StepFailed) as e:
        print(f"\npipeline stopped: {e}", file=sys.stderr)
        return 1
    print(f"\npipeline finished in {(time.time() - start) / 60:.1f} min\n" + summary(args.profile, overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
