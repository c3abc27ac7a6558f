"""Merge benchmark CSVs written elsewhere (a GPU session's ``--out``) into ``bench/results/``.

    python -m tools.merge_results DIR|session.tgz [--into bench/results]

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
# the committed results folder, wherever the command runs from
DEFAULT_INTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


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


def merge_session(tgz: str, into: str) -> int:
    """A GPU call's ``session.tgz`` (tools/gpu_verify.py): merge its results/ and print its verdict table."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        results = os.path.join(tmp, "results")
        if os.path.isdir(results) and any(n.endswith(".csv") for n in os.listdir(results)):
            merge(results, into)
        else:
            print("merge_results: the session wrote no benchmark rows")
        tuned = os.path.join(tmp, "tuned")
        if os.path.isdir(tuned):  # the tuners ran: their tables replace the checked-in ones, for review
            dst = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "tuned")
            for name in sorted(os.listdir(tuned)):
                shutil.copyfile(os.path.join(tuned, name), os.path.join(dst, name))
                print(f"kernels/tuned/{name} replaced by the session's (review: git diff kernels/tuned)")
        for name in ("targets.md",):
            path = os.path.join(tmp, name)
            if os.path.exists(path):
                with open(path) as f:
                    print("\n" + f.read())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="folder holding <script>.csv files, or a GPU call's session.tgz")
    ap.add_argument("--into", default=DEFAULT_INTO)
    args = ap.parse_args(argv)
    if args.src.endswith((".tgz", ".tar.gz")):
        return merge_session(args.src, args.into)
    return merge(args.src, args.into)


if __name__ == "__main__":
    sys.exit(main())
