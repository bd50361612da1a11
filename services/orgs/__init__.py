"""The orgs service (机构): organizations, internal units, functions, the org tree, lifecycle."""
