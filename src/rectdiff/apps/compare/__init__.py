"""``rectdiff compare``: forms x predictions trained under equal hyperparameters, then rectified.

    config    CompareConfig and its tables, loaded from TOML
    run       the cells (teacher, pairs, rectified student), evaluation and diagnosis
    report    results.json, report.md and its tables
"""
