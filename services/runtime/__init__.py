"""What all services share: settings, logging, database, broker, outbox, inbox, health."""
