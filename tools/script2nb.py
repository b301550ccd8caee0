"""Write a notebook from a percent-format script (an authoring aid; the notebook is the source of truth).

Cells start with a line `# %%` (code) or `# %% [markdown]` (markdown, written as plain text, not commented out).
Optional tags: `# %% tags=parameters,slow`.
Usage: python tools/script2nb.py SCRIPT.py NOTEBOOK.ipynb
"""
import re
import sys
from pathlib import Path

import nbformat

_HEADER = re.compile(r'^# %%(?P<md>\s*\[markdown\])?(?:\s+tags=(?P<tags>\S+))?\s*$')


def script_to_notebook(text: str) -> nbformat.NotebookNode:
    cells, kind, tags, lines = [], None, [], []

    def flush():
        if kind is None: return
        src = '\n'.join(lines).strip('\n')
        if not src: return
        cell = nbformat.v4.new_markdown_cell(src) if kind == 'md' else nbformat.v4.new_code_cell(src)
        if tags: cell.metadata['tags'] = tags
        cells.append(cell)

    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            flush()
            kind = 'md' if m['md'] else 'code'
            tags = m['tags'].split(',') if m['tags'] else []
            lines = []
        else:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    return nb


if __name__ == '__main__':
    src, dst = map(Path, sys.argv[1:3])
    nbformat.write(script_to_notebook(src.read_text()), dst)
    print(f'wrote {dst}')
