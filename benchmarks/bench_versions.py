"""The publish-side benchmark on several Celery versions in one run, one venv per version.

Every round runs ``benchmarks.bench_dispatch --rounds 1`` once in each venv, one after the
other, the order turning round by round, so that whatever else loads the machine falls on all
versions alike. Each run starts its own Redis, uses the benchmark database (``DATABASE_URL``,
else bench_dispatch's default) and warms up before its timed round. The table gives, per venv,
each variant's median seconds over the rounds and its ratio to plain Celery measured in the same
venv (plain s / variant s, > 1 is faster), so versions are compared by what the app adds to
Celery rather than by Celery's own speed.

Run from the repository root, with venvs that differ only in Celery (same Python and Django)::

    python -m benchmarks.bench_versions --rounds 5 var/venv-celery55 .venv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import log, markdown_table, median, rotated

REPO_ROOT = Path(__file__).resolve().parent.parent
_VERSIONS = (
    "import sys, celery, kombu, django; "
    "print(f'Python {sys.version_info[0]}.{sys.version_info[1]}, Django {django.__version__}, "
    "Celery {celery.__version__}, kombu {kombu.__version__}')"
)


@dataclass
class Venv:
    """A venv to measure in, what it runs, and the seconds measured there by variant."""

    path: Path
    versions: str = ""
    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)  # scenario: its plain variant

    @property
    def python(self) -> Path:
        """The venv's interpreter."""
        return self.path / "bin" / "python"


def describe(venv: Venv) -> str:
    """The Python, Django, Celery and kombu versions of ``venv`` (raises if it cannot run)."""
    if not venv.python.exists():
        raise SystemExit(f"{venv.path}: no bin/python, not a venv")
    done = subprocess.run([str(venv.python), "-c", _VERSIONS], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def run_once(venv: Venv, output: Path) -> None:
    """One round of bench_dispatch in ``venv``; its seconds are added to ``venv.seconds``."""
    done = subprocess.run(
        [str(venv.python), "-m", "benchmarks.bench_dispatch", "--rounds", "1",
         "--json", str(output)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"bench_dispatch failed in {venv.path} (exit {done.returncode})")
    for run in json.loads(output.read_text(encoding="utf-8")):
        key = (run["scenario"], run["variant"])
        venv.seconds.setdefault(key, []).extend(run["seconds"])
        if run["baseline"]:
            venv.baselines[run["scenario"]] = run["variant"]


def table(venvs: Sequence[Venv]) -> list[str]:
    """Markdown lines: per scenario and variant, each venv's median seconds and ratio."""
    headers = ["scenario", "variant"]
    for number in range(1, len(venvs) + 1):
        headers += [f"median s ({number})", f"ratio ({number})"]
    rows = []
    for scenario, variant in venvs[0].seconds:
        row = [scenario, variant]
        for venv in venvs:
            seconds = median(venv.seconds[(scenario, variant)])
            plain = median(venv.seconds[(scenario, venv.baselines[scenario])])
            row += [f"{seconds:.3f}", f"{plain / seconds:.2f}x"]
        rows.append(row)
    legend = [f"({number}) {venv.path}: {venv.versions}" for number, venv in enumerate(venvs, 1)]
    return [*legend, "", *markdown_table(headers, rows)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venvs", nargs="+", type=Path, help="venvs to measure in (two or more)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in each venv (default 5)")
    args = parser.parse_args(argv)
    if len(args.venvs) < 2 or args.rounds < 1:
        parser.error("give two or more venvs and one or more rounds")
    venvs = [Venv(path) for path in args.venvs]
    for venv in venvs:
        venv.versions = describe(venv)
        log(f"{venv.path}: {venv.versions}")
    by_name = {str(venv.path): venv for venv in venvs}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for name in rotated(list(by_name), round_index):
                log(f"round {round_index + 1}/{args.rounds}: {name}")
                run_once(by_name[name], Path(scratch) / "seconds.json")
    title = (f"Publish side by venv: median of {args.rounds} interleaved rounds; "
             "ratio = plain Celery s / variant s in the same venv")
    print("\n".join([title, "", *table(venvs)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
