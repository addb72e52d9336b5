"""A failing test that ran `hubcore serve` processes (tests/shared/processes.py)
gets their logs in its report: what the instances said is most of the story."""
from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.shared.processes import Instances


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Instances):
                report.sections.append(("hubcore instances' logs", value.logs()))
    return report
