#!/usr/bin/env python3
"""Train timm / NOAH models: thin entry point for noah_mlp.train (see `python train.py --help`)."""
import sys

from noah_mlp.train import main

if __name__ == '__main__':
    sys.exit(main())
