"""Evaluation harness above the runner: the exact comparison protocol (protocol.py), the paper tables built from run
summaries (tables.py) and the README's method table (method_table.py)."""
