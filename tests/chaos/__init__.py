"""The chaos suite (issue #8): a load generator with a ledger, a checker, fault scenarios."""
