"""What the tests share: the drtool runner, repository and stack builders, comparisons of what
two stacks hold, the fault proxy, the Docker tier's fixtures and a fake clock.

Test modules import from here (``from support.cli import run_drtool``); fixtures live in
tests/conftest.py, never in a sibling test module.
"""
