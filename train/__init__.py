"""KensaVL train."""
