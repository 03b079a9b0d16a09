"""Why an attempt of a job ended and what to do next: the failure handling of hpcdist, one concern a module.

    evidence   the facts an ending is read from (Evidence) and the readers of srun's and the ranks' logs
    rules      classify(): an ordered table of small rules, the first that recognises the evidence wins
    policy     decide(): requeue, relaunch in the allocation, retry through the queue, or stop
    record     JOB_DIR/attempts.jsonl, one line per attempt (contract 2)
    gather     inside the job after a step: evidence from the job directory and Slurm, then classify, decide, record
    reconcile  afterwards: the attempts accounting saw end unrecorded, and the nudge of a requeued job
"""
