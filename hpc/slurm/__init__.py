"""Everything hpcdist says to Slurm and reads back: the only package that runs a Slurm command.

    runner    run(argv): one timeout policy, one error type (SlurmError), a fake Slurm for tests
    commands  one function per request hpcdist makes (sbatch, scancel, scontrol, squeue, sacct, sinfo)
    states    Slurm's job states: which are terminal, live, requeued
    grammar   Slurm's durations, timestamps and exit codes
"""
