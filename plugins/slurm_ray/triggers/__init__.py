"""slurm_ray triggers."""
