"""Part of the orgs service."""
