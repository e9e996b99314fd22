"""Per-seed tables of a study store, in Markdown (docs/studies/gates.md holds the flagship study's):

    python docs/studies/per_seed.py docs/studies/gates/study.sqlite

One table per base (task): a row per configuration in the study's order, the test metric of each seed
(or its status when it did not finish), and the mean ± standard deviation (n − 1) over the finished
seeds. Read-only: the store is opened with ``mode=ro``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
from pathlib import Path


def tables(store: Path) -> str:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    rows = db.execute("SELECT base, label, seed, status, value, idx FROM trials WHERE in_study = 1").fetchall()
    seeds = sorted({r[2] for r in rows})
    out = []
    for base in dict.fromkeys(r[0] for r in sorted(rows, key=lambda r: r[5])):
        mine = [r for r in rows if r[0] == base]
        labels = list(dict.fromkeys(r[1] for r in sorted(mine, key=lambda r: r[5])))
        out += [f"**{base}**", "", "| configuration | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
                "|---|" + "---|" * (len(seeds) + 1)]
        for label in labels:
            by_seed = {r[2]: r for r in mine if r[1] == label}
            cells, values = [], []
            for s in seeds:
                r = by_seed.get(s)
                if r is None:
                    cells.append("—")
                elif r[3] == "done" and r[4] is not None:
                    cells.append(f"{r[4]:.4f}")
                    values.append(r[4])
                else:
                    cells.append(r[3])
            summary = (f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1
                       else f"{values[0]:.4f}" if values else "—")
            out.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="a study's study.sqlite")
    args = parser.parse_args()
    if not args.store.is_file():
        parser.error(f"{args.store}: no such store")
    print(tables(args.store))


if __name__ == "__main__":
    main()
