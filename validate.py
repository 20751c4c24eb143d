#!/usr/bin/env python3
"""Evaluate timm / NOAH models: thin entry point for noah_mlp.validate (see `python validate.py --help`)."""
import sys

from noah_mlp.validate import main

if __name__ == '__main__':
    sys.exit(main())
