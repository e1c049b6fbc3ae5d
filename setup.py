"""Shim for tools that still call ``setup.py`` (``pip install -e .`` with an old pip, ``python setup.py develop``):
everything, metadata included, is in ``pyproject.toml``."""

from setuptools import setup

setup()
