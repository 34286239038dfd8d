"""Conformance suites for plugin authors."""

import pytest

# Bare asserts in the suites give pytest's detailed failure messages only if
# rewritten, which pytest does for test files and registered modules.
pytest.register_assert_rewrite("core.testing.store_suite")
