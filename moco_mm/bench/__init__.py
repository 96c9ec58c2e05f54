"""Benchmarks: figures are ratios against a baseline timed in the same run, never asserted
in tests (tests check only that the programs run and report every figure).

    step.py        `moco-mm bench`: our step against OpenCLIP and the MoCo/ALBEF style
    systems.py     the systems compared, on the same towers and batch
    components.py  the step's parts against their twins (EMA, queue loss)
    timing.py      interleaved rounds, medians, paired ratios
    loader.py      `moco-mm bench-loader`: loader samples/s by worker count
    serve_load.py  `moco-mm bench-serve`: p50/p99 latency and queries/s of a running search server
    compare.py     `moco-mm compare-objectives`: held-out R@k of every objective and variant
    gpu_check.py   `moco-mm gpu-check`: the first run on a GPU machine (memory against the
                   planner, samples/s against OpenCLIP, bf16 loss, NCCL gather, exact resume)

Imports: the base modules, `moco_mm.model`, `moco_mm.data`, `moco_mm.train`, `moco_mm.plan`
(gpu_check compares measured memory with the planner's) and itself; never search or cli.
tests/test_layout.py checks this.
"""
