"""The README shows the committed result tables as they are: each block it marks as a copy of a
``results/`` file must equal that file, so a regenerated table cannot leave stale numbers behind."""
from __future__ import annotations

import re

from esc.config import CONF_DIR

ROOT = CONF_DIR.parent
BLOCK = re.compile(r"<!-- table: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end table -->", re.S)


def test_readme_tables_equal_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    blocks = list(BLOCK.finditer(readme))
    assert blocks, "the README marks no result table"
    for m in blocks:
        path = ROOT / m["path"]
        assert path.is_file(), f"README copies {m['path']}, which does not exist"
        assert m["body"].strip() == path.read_text().strip(), \
            f"README's copy of {m['path']} differs from the file: regenerate the table and paste it again"
