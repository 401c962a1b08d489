"""KensaVL modeling."""
