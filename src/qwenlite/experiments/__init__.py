"""The coursework's experiments as one protocol: a plan that fits the FLOPS budget
(:mod:`.plan`), a runner that trains, evaluates, selects and resumes (:mod:`.runner`), and job
scripts for a cluster (:mod:`.slurm`). ``python -m qwenlite.sweep`` is the command line."""
