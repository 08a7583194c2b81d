"""The paper-style comparison table of a sweep: ``python experiments/coco_fid/make_table.py <sweep dir>``.

Reads every run's ``summary.json`` under the directory (one per method and shard), merges each method's shards,
computes FID and CLIP-FID over the merged images against the real images of the same captions (clean-fid; reference
statistics cached), and writes ``table.md`` and ``table.csv`` into the sweep directory (or ``--out``):

    method | FID | CLIP-FID | time per image | NFEs per iteration | ms per iteration | peak memory | images | shards

Runs under different protocols (prior, steps, resolution, prompt set, seed) are refused with the differences
listed; ``--by-protocol`` writes one table per protocol instead. On the exact prior the exact metrics replace FID.
An unreadable ``summary.json`` (a truncated file) is named in a one-line warning and left out: the table is made from
the other runs, its method's row shows the shard missing, and the file is listed under the table (``--strict``:
stop with exit 2 instead).

    python experiments/coco_fid/make_table.py multirun/2026-11-22/10-00-00
    python experiments/coco_fid/make_table.py sweep/ --fid random_cnn --clip-fid none   # offline smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from sdbridge.eval.tables import ProtocolMismatch, collect, csv_text, find_summaries, markdown, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep directory)")
    parser.add_argument("--fid", default="inception", help="FID features: inception, clip, random_cnn, "
                        "module:function, or none")
    parser.add_argument("--clip-fid", default="clip", help="CLIP-FID features (same choices)")
    parser.add_argument("--cache", default=os.environ.get("SDB_FID_CACHE", "~/.cache/sdbridge/fid"),
                        help="where reference statistics are cached")
    parser.add_argument("--device", default=None, help="feature extraction device (default: cuda if available)")
    parser.add_argument("--by-protocol", action="store_true", help="one table per protocol instead of refusing")
    parser.add_argument("--strict", action="store_true", help="stop at an unreadable summary.json instead of "
                        "leaving its run out of the table (and listing it under the table)")
    args = parser.parse_args(argv)
    none = lambda v: None if v in (None, "", "none") else v  # noqa: E731
    damaged: list[str] | None = None if args.strict else []
    try:
        groups = collect(find_summaries(args.sweep_dir, damaged), by_protocol=args.by_protocol)
    except (ProtocolMismatch, FileNotFoundError, ValueError) as err:
        print(f"make_table: error: {err}", file=sys.stderr)
        return 2
    for problem in damaged or ():
        print(f"make_table: warning: left out of the table: {problem}", file=sys.stderr)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(groups):
        rows = score(group, none(args.fid), none(args.clip_fid), args.cache, args.device)
        suffix = "" if len(groups) == 1 else f"_{i}"
        text = markdown(rows, group[0].protocol, damaged or ())
        (out / f"table{suffix}.md").write_text(text)
        (out / f"table{suffix}.csv").write_text(csv_text(rows))
        (out / f"table{suffix}.json").write_text(json.dumps({"protocol": group[0].protocol, "rows": rows}, indent=1))
        print(text)
        for r in rows:
            if r["missing_shards"]:
                print(f"make_table: {r['method']} is missing shards {r['missing_shards']}: its row covers "
                      f"{r['images']} images only", file=sys.stderr)
    print(f"make_table: wrote {out / 'table.md'} and table.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
