"""The service's routers, one per group of endpoints; each handler only parses, delegates and shapes."""
