"""Imports every message module so the type registry is complete."""

from contracts import audit, notify, orgs, quota, results, roster

__all__ = ["audit", "notify", "orgs", "quota", "results", "roster"]
