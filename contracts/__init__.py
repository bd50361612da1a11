"""The bianzhi wire contract: envelope, topics, messages, identifiers and reference codes.

Outside systems are built against ``WIRE-CONTRACT.md``; these models implement it. This package
depends on pydantic only, so any Python front-end or downstream consumer may import it alone.
"""
