"""Merge benchmark CSVs written elsewhere (a GPU session's ``--out``) into ``bench/results/``.

    python bench/merge_results.py DIR [--into bench/results]

Each ``DIR/<script>.csv`` has its rows appended to ``<into>/<script>.csv`` (columns matched by name, so
a script that gained a column merges into an older file), and its plot ``DIR/<script>.png``, drawn from
that run, replaces the committed one. Rows already present (same timestamp, SHA, case, backend, mode)
are not added twice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from sam_fast.bench.harness import append_csv, read_csv

KEY = ("timestamp", "git_sha", "op", "case", "backend", "mode")


def merge(src_dir: str, into: str) -> int:
    names = sorted(n for n in os.listdir(src_dir) if n.endswith(".csv"))
    if not names:
        raise SystemExit(f"merge_results: no .csv files in {src_dir}")
    for name in names:
        rows, columns = read_csv(os.path.join(src_dir, name))
        dst = os.path.join(into, name)
        seen = {tuple(r.get(k, "") for k in KEY) for r in read_csv(dst)[0]} if os.path.exists(dst) else set()
        new = [r for r in rows if tuple(r.get(k, "") for k in KEY) not in seen]
        append_csv(dst, new, columns)  # by column name; columns the file lacks are added to it
        png = os.path.join(src_dir, name[:-4] + ".png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(into, os.path.basename(png)))
        print(f"{name}: {len(new)} rows added ({len(rows) - len(new)} already there)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="folder holding <script>.csv files")
    ap.add_argument("--into", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    return merge(args.src, args.into)


if __name__ == "__main__":
    sys.exit(main())
