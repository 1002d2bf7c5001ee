"""The `spark` command line, the front door over every layer: `main` (run, ls, show, reflect, eval) and the
sub-command groups it mounts, `stack` (the local stack, infra/local) and `deploy` (deployments/)."""
