"""The `bianzhi` command: run the platform on one machine (`up`) and talk to it."""
