"""bytelift test suite (a package so that tests can share helpers: `from tests.tiny_tokenizers import ...`)."""
