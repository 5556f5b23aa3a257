"""Fused students: the jobs of a sweep that differ only in method scalars which leave the batches unchanged
(method.T, method.alpha, ...) train in one process on the same batches, with one teacher forward (or cache
lookup) per batch for all of them; every job keeps its own run directory, record, checkpoint and resume.
`kdrun -m ... fuse=true` (or fuse=K, at most K jobs per group) selects the `kdrun_fused` Hydra launcher."""
