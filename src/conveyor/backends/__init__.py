"""Storage and transport: the only code that touches SQL, Redis keys or HTTP."""
