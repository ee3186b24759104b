"""``rectdiff compare``: forms x predictions trained under equal hyperparameters, then rectified.

tables           the config's [data], [grid], [network], [reference], [rectify] and
                 [evaluation] tables
config           CompareConfig, loaded from TOML (load_config, quick_config)
hyperparameters  what each cell trains and samples with (equal in t or in logsnr)
evaluate         seeded noise streams and scoring a model's solves
cells            one cell: teacher, pairs, rectified student, each measured
run              run_compare: the data, the cells (in worker processes), the outputs
report           results.json's summaries and report.md
figures          the figures, from results.json and from the cells
saved            saved outputs read back (``rectdiff diagnose`` and ``rectdiff plot``)
"""
