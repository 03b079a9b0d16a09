"""hpcdist's subcommands, one module per area; each imports only what its commands need."""
