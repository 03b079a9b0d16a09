"""``python -m hpc`` runs the hpcdist command line (what job scripts call on compute nodes)."""

from hpc.cli import main

main(prog_name="hpcdist")
