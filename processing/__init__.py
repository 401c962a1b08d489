"""KensaVL processing."""
