"""The bundled bertstream client."""
