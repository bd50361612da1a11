"""Part of the notify service."""
