"""The bianzhi services: orgs, quota, roster, notify, and the runtime they share."""
