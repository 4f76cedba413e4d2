"""Judging an answer: the validation ladder, its static rules and screen, pytest, ruff and coverage
runs, and the sandbox they run in.
"""
