"""Where a job's runs execute: this machine (`--executor local`, fpl_bench/experiment.py and
fpl_bench/parallel.py, as always), or a cluster: Ray (`ray`) or Slurm through submitit
(`slurm`), every run logging to one MLflow tracking store (docs/cluster.md).

options.py        the flags (`--executor`, `--tracking-uri`, `--address`, `--cluster-config`,
                  `--slurm-partition`, `--time-min`, `--gpus`, `--array-parallelism`)
                  as one `ExecutorChoice`
config.py         `ClusterConfig`: the [ray] and [slurm] settings, their defaults and the file
cells.py          `CellTask` (one run anywhere) and `run_cell`, what every worker calls: the
                  cell's lock, skip if done in the tracking store, resume from its checkpoint
records.py        the tracking store read by record key: done, abandoned, done keys
dispatch.py       the submitting side: tasks out, results into OUT/results.csv and the job record
ray_backend.py    `RayExecutor`: a Ray task per run, retried on worker death
slurm_backend.py  `SlurmExecutor`: job arrays through submitit, requeued on pre-emption
tuning.py         `tune --executor ray|slurm`: the tuning workers as Ray tasks or Slurm jobs
estimate.py       a dry run's resource requests and GPU-hours
progress.py       a suite's progress (done, running, failed, ETA) from the tracking store

Nothing here is imported by the core (experiment, driver): the executors call into it.
"""
