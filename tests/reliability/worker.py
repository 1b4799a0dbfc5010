"""A bioembed run in its own process, for fault tests to kill: `python -m tests.reliability.worker HOME PLATE...`.

Materializes the named plates of the home end to end (the demo's path, in-process Dagster) and
prints one JSON line: plates that made it and the failures.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from dagster_project.demo import materialize_home, use_home
    from dagster_project.resources import BioembedHome

    home_dir, plates = argv[0], argv[1:]
    home = use_home(home_dir)
    outcome = materialize_home(home, plates, BioembedHome(root=str(home.root), null_size=200), log=lambda *_: None)
    print(json.dumps({"ok": outcome.plates_ok, "failures": outcome.failures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
