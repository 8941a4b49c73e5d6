"""slurm_ray utils."""
