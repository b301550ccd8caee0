"""Packaging: every dependency is declared once, in settings.ini (tested versions: constraints.txt)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent / 'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

licenses = {'apache2': 'Apache-2.0'}
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
readme = Path(__file__).parent / 'README.md'

setuptools.setup(
    name=cfg['repo'],
    version=cfg['version'],
    description=cfg['description'],
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else cfg['description'],
    long_description_content_type='text/markdown',
    author=cfg['author'],
    author_email=cfg['author_email'],
    license=licenses[cfg['license']],
    url=cfg['git_url'],
    keywords=cfg['keywords'].split(),
    classifiers=[
        f"Development Status :: {cfg['status']} - {statuses[int(cfg['status'])]}",
        f"Intended Audience :: {cfg['audience']}",
        'Natural Language :: English',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Medical Science Apps.',
    ],
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=['echocare_clip', 'echocare_clip.*']),
    package_data={'echocare_clip': ['resources/*', 'resources/**/*']},
    include_package_data=True,
    install_requires=cfg['requirements'].split(),
    extras_require={'dev': cfg['dev_requirements'].split(), 'sim': ['pymust>=0.1.9']},
    entry_points={'console_scripts': cfg['console_scripts'].split(), 'nbdev': [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
