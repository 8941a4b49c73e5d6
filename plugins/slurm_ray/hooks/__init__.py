"""slurm_ray hooks."""
