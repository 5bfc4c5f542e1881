"""Benchmarks run by ``make bench``: each returns table rows, printed together by ``bench.__main__``."""
