"""hpcdist's submit side: render, check and submit Slurm jobs (never imports torch)."""

__version__ = "0.1.0"
