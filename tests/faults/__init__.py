"""The fault-injection harness (`make test-faults`; a fast subset runs in tests/test_faults.py)."""
