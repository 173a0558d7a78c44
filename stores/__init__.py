"""Store adapters: Feast (online on SQLite or Redis, offline files, registry) and the Iceberg catalog and tables."""
