"""Doing a task: the worker pool, delivering outputs and reports, and the reports' text."""
