"""Grid files: what to execute (:mod:`.spec`), here (:mod:`.local`) or on SLURM (:mod:`.slurm`)."""
