"""A toolkit for plugin authors' tests.

- :mod:`core.testing.provider_suite`: ``ProviderConformance``, the tests every provider passes.
- :mod:`core.testing.store_suite`: ``StoreConformance``, the tests every store passes, and
  ``LeaseConformance`` for a store that offers leases.
- :mod:`core.testing.web_search_suite`: ``WebSearchConformance``, for web search plugins.
- :mod:`core.testing.fake_upstream`: a fake OpenAI-compatible server to point an HTTP provider at.
- :mod:`core.testing.gateway`: a real gateway on loopback with your plugin loaded, for surfaces.

``docs/plugins.md`` shows each in use.
"""

import pytest

# Bare asserts in the suites give pytest's detailed failure messages only if
# rewritten, which pytest does for test files and registered modules; the
# registration must come before the suites are imported, so it lives here.
pytest.register_assert_rewrite(
    "core.testing.provider_suite", "core.testing.store_suite", "core.testing.web_search_suite"
)
