"""`python -m nima_edge.train [options]` = `nima-edge train [options]`; the torchrun entry point:

    torchrun --nproc_per_node 2 -m nima_edge.train --recipe nima-1m --out runs/nima-1m-ddp
"""
import sys

from nima_edge.cli import main

sys.argv[1:1] = ["train"]
main()
