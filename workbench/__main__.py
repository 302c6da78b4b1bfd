"""Command line: ``python -m workbench verify STORE`` and ``python -m workbench migrate STORE``.

``verify`` walks every chunk of every array and every lineage link and prints a table; it exits 1 on any
fault (2 when the store cannot be opened). ``migrate`` upgrades a layout-version-1 store in place, crash-safely.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every chunk and lineage link of a store; exit 1 on any fault")
    v.add_argument("store")
    v.add_argument("--no-values", action="store_true", help="skip re-hashing chunk values (checksums only)")
    v.add_argument("--all", action="store_true", help="print the ok rows too")
    m = sub.add_parser("migrate", help="upgrade a layout-version-1 store in place (crash-safe)")
    m.add_argument("store")
    args = parser.parse_args(argv)

    from workbench.errors import WorkbenchError

    if args.command == "migrate":
        from workbench.migrate import migrate

        try:
            print(migrate(args.store))
        except WorkbenchError as exc:
            print(f"migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        return 0
    import pandas as pd

    from workbench.dataset import verify

    table = verify(args.store, values=not args.no_values)
    faults = table[table.status != "ok"]
    with pd.option_context("display.max_colwidth", 160, "display.width", 220, "display.max_rows", 10000):
        shown = table if args.all else faults
        if len(shown):
            print(shown.to_string(index=False))
    n_ok = int((table.status == "ok").sum())
    print(f"{args.store}: {len(faults)} fault(s), {n_ok} check(s) ok")
    if len(faults) and (faults.check == "open").any():
        return 2
    return 1 if len(faults) else 0


if __name__ == "__main__":
    sys.exit(main())
