"""Imports every message module so the type registry is complete."""

from contracts import notify, orgs, quota, results, roster

__all__ = ["notify", "orgs", "quota", "results", "roster"]
