"""HTTP: the server, the web configuration (TLS, basic auth)."""
