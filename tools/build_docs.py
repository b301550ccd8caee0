"""Build README.md from nbs/index.ipynb and (unless --readme-only) the docs site from the notebooks.

quarto, which nbdev_docs needs, cannot be installed everywhere (it downloads a binary), so the site is built with
nbconvert alone: every notebook is executed in a fresh kernel and rendered to HTML with a shared navigation bar.
Usage: python tools/build_docs.py [--readme-only] [--out _site] [--no-execute]
"""
import argparse
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
_DIRECTIVE = re.compile(r'^\s*#\|')


def notebook_to_markdown(nb) -> str:
    "Markdown cells as they are; code cells (minus `#|` directives) as fenced Python; outputs left out."
    parts = []
    for cell in nb.cells:
        src = cell.source.strip()
        if cell.cell_type == 'markdown': parts.append(src)
        elif cell.cell_type == 'code':
            code = '\n'.join(l for l in src.splitlines() if not _DIRECTIVE.match(l)).strip()
            if code: parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(parts) + '\n'


def write_readme() -> Path:
    nb = nbformat.read(NBS / 'index.ipynb', as_version=4)
    text = '<!-- Generated from nbs/index.ipynb by tools/build_docs.py: edit the notebook, not this file. -->\n\n'
    text += notebook_to_markdown(nb)
    out = ROOT / 'README.md'
    if not out.exists() or out.read_text() != text: out.write_text(text)
    return out


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--readme-only', action='store_true')
    ap.add_argument('--out', default=str(ROOT / '_site'))
    ap.add_argument('--no-execute', action='store_true')
    args = ap.parse_args()
    print(f'wrote {write_readme()}')
    if not args.readme_only:
        from echocare_clip.docsite import build_site
        print(f'site: {build_site(NBS, Path(args.out), execute=not args.no_execute)}')
