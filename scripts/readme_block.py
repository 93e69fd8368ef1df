#!/usr/bin/env python
"""Replace a generated block of README.md: what stands between ``<!-- NAME -->`` and
``<!-- /NAME -->``. README's figures come from runs, never from typing:

    python -m dp | python scripts/readme_block.py dp-demo --code
"""

from __future__ import annotations

import argparse
import sys


def write_block(readme_path: str, name: str, text: str) -> int:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    with open(readme_path) as f:
        readme = f.read()
    if (readme.count(begin) != 1 or readme.count(end) != 1
            or readme.index(begin) > readme.index(end)):
        print(f"readme_block: {readme_path} needs one {begin} ... {end} pair", file=sys.stderr)
        return 1
    head, rest = readme.split(begin)
    _, tail = rest.split(end)
    with open(readme_path, "w") as f:
        f.write(head + begin + "\n" + text.rstrip("\n") + "\n" + end + tail)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="the block's marker name")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--code", action="store_true", help="fence standard input as a code block")
    args = ap.parse_args(argv)
    text = sys.stdin.read()
    if args.code:
        text = "```text\n" + text.rstrip("\n") + "\n```"
    return write_block(args.readme, args.name, text)


if __name__ == "__main__":
    sys.exit(main())
