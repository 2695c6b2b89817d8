import pytest

# The shared engine contract asserts outside test modules; let pytest explain its failures too.
pytest.register_assert_rewrite("tests.engines.contract")
