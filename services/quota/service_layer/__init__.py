"""Part of the quota service."""
