"""Merge benchmark CSVs written elsewhere (a GPU session's ``--out``) into ``bench/results/``.

    python bench/merge_results.py DIR [--into bench/results]

Each ``DIR/<script>.csv`` has its rows appended to ``<into>/<script>.csv`` (columns matched by name, so
a script that gained a column merges into an older file), and its plot ``DIR/<script>.png``, drawn from
that run, replaces the committed one. Rows already present (same timestamp, SHA, case, backend, mode)
are not added twice.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys

KEY = ("timestamp", "git_sha", "op", "case", "backend", "mode")


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def merge(src_dir: str, into: str) -> int:
    names = sorted(n for n in os.listdir(src_dir) if n.endswith(".csv"))
    if not names:
        raise SystemExit(f"merge_results: no .csv files in {src_dir}")
    for name in names:
        columns, rows = _read(os.path.join(src_dir, name))
        dst = os.path.join(into, name)
        seen = set()
        if os.path.exists(dst):
            dst_columns, dst_rows = _read(dst)
            missing = [c for c in columns if c not in dst_columns]
            if missing:  # rewrite the file with the new columns appended, old rows blank there
                all_columns = dst_columns + missing
                with open(dst, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=all_columns)
                    w.writeheader()
                    w.writerows(dst_rows)
                columns_out = all_columns
            else:
                columns_out = dst_columns
            seen = {tuple(r.get(k, "") for k in KEY) for r in dst_rows}
        else:
            columns_out = columns
        new = [r for r in rows if tuple(r.get(k, "") for k in KEY) not in seen]
        write_header = not os.path.exists(dst)
        with open(dst, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns_out, extrasaction="ignore")
            if write_header:
                w.writeheader()
            w.writerows(new)
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
