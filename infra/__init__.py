"""Infrastructure around the pipeline: the local stack (`infra.local`) and environment recipes."""
