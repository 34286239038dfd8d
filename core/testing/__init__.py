"""A toolkit for plugin authors' tests.

- :mod:`core.testing.provider_suite`: ``ProviderConformance``, the tests every provider passes.
- :mod:`core.testing.store_suite`: the tests every store passes.
- :mod:`core.testing.fake_upstream`: a fake OpenAI-compatible server to point an HTTP provider at.
"""

import pytest

# Bare asserts in the suites give pytest's detailed failure messages only if
# rewritten, which pytest does for test files and registered modules; the
# registration must come before the suites are imported, so it lives here.
pytest.register_assert_rewrite("core.testing.provider_suite", "core.testing.store_suite")
