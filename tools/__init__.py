"""Tools run from a checkout, not installed: the bench floors and the memory probe."""
