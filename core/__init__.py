"""chatgate core: the plugin host, configuration, domain types and shared services."""

__version__ = "0.1.0"
