"""API surfaces: each package adapts one HTTP dialect to core services."""
