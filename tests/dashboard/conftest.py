from tests.dashboard.support import browser  # noqa: F401 - the fixture, for every dashboard test
