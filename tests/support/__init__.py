"""Fakes that implement ohd's real interfaces, and helpers shared by the tests."""
