"""sottovoce wire protocol, client library and CLI."""
